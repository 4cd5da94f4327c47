"""The floors of the package (ARCHITECTURE.md), enforced by rule on the import graph, not by a list of files.

Every module of ``nnunet_transfer`` is parsed with :mod:`ast`; every import of the package's own modules, at the
top of a module or inside a function, is an arrow. The rules:

(a) nothing outside ``cli/`` imports ``nnunet_transfer.cli`` (the command line is the top floor);
(b) no circle among modules;
(c) an import of ``nnunet_transfer.*`` inside a function (outside ``cli/``, whose verbs import their API when
    they run) says why on its line (``# lazy: …``): it saves start-up time of a command;
(d) every arrow goes to the same or a lower floor of :data:`FLOORS`, keyed by the top-level module or package,
    so that splitting a module or adding one to a package needs no edit here.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "nnunet_transfer"
ROOT = Path(__file__).parents[1] / PACKAGE

#: floor of each top-level module or package of nnunet_transfer ("" is the package's own __init__); an import
#: may go to its own floor or lower. A new top-level module or package needs a line here (and in ARCHITECTURE.md).
FLOORS = {
    # 0: the exceptions every floor raises, and the version
    "": 0, "errors": 0,
    # 1: leaves: nnU-Net copies (guarded), torch/file helpers, settings, synthetic data, running programs
    "nnunet_compat": 1, "netutil": 1, "fileio": 1, "figures": 1, "config": 1, "data": 1, "pipeline": 1,
    # 2: nnU-Net's folders and networks, the block model, checkpoints, the environment, process-wide effects
    "nnunet_io": 2, "blocks": 2, "checkpoints": 2, "environment": 2, "trainer_messages": 2, "runtime": 2,
    # 3: plans and weights, pure-torch policies, run mechanics of a trainer
    "plans": 3, "policies": 3, "training": 3,
    # 4: the trainers; evaluation, comparison, splits and the convergence of a run's curve
    "trainers": 4, "experiments": 4,
    # 5: the analysis of networks (it reads the splits' test cases and the convergence epoch)
    "analysis": 5,
    # 6: what composes everything: studies, the demo, the shims nnU-Net and Python's start-up import
    "study": 6, "demo": 6, "_ext": 6, "_hints": 6,
    # 7: the command line
    "cli": 7,
}
TOP = "cli"


@dataclass(frozen=True)
class Arrow:
    source: str        # importing module, dotted
    target: str        # imported module, dotted (a package means its __init__)
    line: int
    in_function: bool
    commented: bool    # a comment on one of the statement's lines


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, package: str = PACKAGE) -> tuple[dict[str, Path], list[Arrow]]:
    """Every import of the package's own modules (top-level and inside functions, relative ones resolved)."""
    mods = modules(root, package)

    def known(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rpartition(".")[0]
        return name

    arrows = []
    for name, path in mods.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        is_package = path.name == "__init__.py"

        def add(node: ast.stmt, targets: list[str], in_function: bool) -> None:
            text = lines[node.lineno - 1:node.end_lineno]
            for t in targets:
                arrows.append(Arrow(name, t, node.lineno, in_function, any("#" in x for x in text)))

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    add(child, [known(a.name) for a in child.names
                                if a.name.split(".")[0] == package], in_function)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = name if is_package else name.rpartition(".")[0]
                        for _ in range(child.level - 1):
                            base = base.rpartition(".")[0]
                        module = f"{base}.{child.module}" if child.module else base
                    else:
                        module = child.module or ""
                    if module.split(".")[0] == package:
                        add(child, [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else known(module)
                                    for a in child.names], in_function)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                               ast.Lambda)))

        visit(ast.parse("\n".join(lines), filename=str(path)), False)
    return mods, arrows


def top_level(module: str) -> str:
    """``nnunet_transfer.study.spec`` -> ``study``; the package itself -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def circles(mods: dict[str, Path], arrows: list[Arrow]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a in arrows:
        if a.target != a.source:
            graph[a.source].add(a.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def into_top_floor(arrows: list[Arrow]) -> list[str]:
    return [f"{a.source} (line {a.line}) imports {a.target}" for a in arrows
            if top_level(a.target) == TOP and top_level(a.source) != TOP]


def uncommented_lazy(arrows: list[Arrow]) -> list[str]:
    return [f"{a.source} (line {a.line}) imports {a.target} inside a function without saying why" for a in arrows
            if a.in_function and not a.commented and top_level(a.source) != TOP]


def floor_problems(mods: dict[str, Path], arrows: list[Arrow], floors: dict[str, int]) -> list[str]:
    problems = [f"{m} ({mods[m]}): its top-level name {top_level(m)!r} has no floor; add it to FLOORS in "
                f"tests/test_layers.py and to ARCHITECTURE.md" for m in mods if top_level(m) not in floors]
    for a in arrows:
        s, t = top_level(a.source), top_level(a.target)
        if s in floors and t in floors and floors[t] > floors[s]:
            problems.append(f"{a.source} (line {a.line}, floor {floors[s]}) imports {a.target} (floor {floors[t]}): "
                            f"an arrow up; move the shared piece down or the importer up")
    return problems


# --------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_graph_is_read(graph):
    # the parser sees top-level, function-level and relative imports (else every rule below passes vacuously)
    mods, arrows = graph
    seen = {(a.source, a.target, a.in_function) for a in arrows}
    assert (f"{PACKAGE}.environment", f"{PACKAGE}.nnunet_io", False) in seen
    assert (f"{PACKAGE}.runtime", f"{PACKAGE}.trainer_messages", True) in seen
    assert (f"{PACKAGE}.analysis.moments", f"{PACKAGE}.analysis.similarity", False) in seen  # from .similarity
    assert f"{PACKAGE}.cli.main" in mods and len(mods) > 50


def test_nothing_below_imports_the_command_line(graph):
    assert into_top_floor(graph[1]) == []


def test_no_circles(graph):
    assert circles(*graph) == []


def test_function_level_imports_say_why(graph):
    found = uncommented_lazy(graph[1])
    assert found == [], "\n".join(found) + "\nimport at the top, or add `# lazy: <what it keeps out of which command>`"


def test_every_arrow_goes_down(graph):
    assert floor_problems(*graph, FLOORS) == []


def test_architecture_md_names_every_floor():
    text = (ROOT.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [name for name in FLOORS if name and f"`{name}" not in text]
    assert missing == [], f"ARCHITECTURE.md does not name {missing}"


# --------------------------------------------------------------------------- the rules on a made-up package
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_rules_catch_each_kind_of_problem(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "low.py": "from pkg.high import thing\n",                       # up a floor (and a circle with high)
        "high.py": "import pkg.low\n\ndef f():\n    from pkg import low\n\ndef g():\n    from pkg import low  # lazy: x\n",
        "cli/__init__.py": "",
        "cli/main.py": "from ..high import f\n",                        # relative, allowed: cli is the top
        "other/__init__.py": "from .a import x\n",
        "other/a.py": "from pkg.cli.main import f\nfrom pkg.other import b\n",   # into cli; a circle with b
        "other/b.py": "from pkg.other.a import x\n",
        "stray.py": "",
    })
    mods, arrows = import_graph(root, "pkg")
    floors = {"": 0, "low": 1, "high": 2, "other": 2, "cli": 3}
    assert into_top_floor(arrows) == ["pkg.other.a (line 1) imports pkg.cli.main"]
    assert sorted(circles(mods, arrows)) == [["pkg.high", "pkg.low"], ["pkg.other.a", "pkg.other.b"]]
    assert uncommented_lazy(arrows) == ["pkg.high (line 4) imports pkg.low inside a function without saying why"]
    problems = floor_problems(mods, arrows, floors)
    assert problems[0].startswith("pkg.stray (") and "'stray' has no floor; add it to FLOORS" in problems[0]
    up = "an arrow up; move the shared piece down or the importer up"
    assert problems[1:] == [f"pkg.low (line 1, floor 1) imports pkg.high (floor 2): {up}",
                            f"pkg.other.a (line 1, floor 2) imports pkg.cli.main (floor 3): {up}"]
    assert ("pkg.cli.main", "pkg.high", False) in {(a.source, a.target, a.in_function) for a in arrows}
