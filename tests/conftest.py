"""Shared fixtures. ``workspace`` is a real nnU-Net tree on generated data, built once per session:

source dataset planned + preprocessed, a tiny configuration (features 8-16-32, patch 32³, batch 2),
a source model pretrained with ``nnUNetTrainerTransferBase``, and the target preprocessed with the
source's plans. Everything runs through nnU-Net's own command-line programs.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.data import make_transfer_pair
from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment
from nnunet_transfer.pipeline import TRAIN_ENV, run_step, train_args
from nnunet_transfer.runtime import CPU_THREADS_VAR

SOURCE_ID, TARGET_ID = 901, 902
TINY = "tiny"
# short runs: 2 epochs x 3 iterations; a checkpoint every epoch
QUICK_SETTINGS = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
                  "save_every": 1, "seed": 0, "final_validation": False}
# the source model trains a little longer so that transfer has something to transfer
PRETRAIN_SETTINGS = {**QUICK_SETTINGS, "num_epochs": 5, "num_iterations_per_epoch": 10,
                     "final_validation": True}


#: session fixtures that several modules share, and those modules: with ``pytest -n`` (scripts/test.sh) these modules
#: run in one worker, so that each fixture is built once (collection refuses a module missing from the list)
SHARED_SESSION_FIXTURES = ("smoke_data", "karimi")
SHARING_MODULES = ("tests/test_e2e_analyze.py", "tests/test_e2e_experiments.py", "tests/test_e2e_freezing.py",
                   "tests/test_e2e_racing.py", "tests/test_e2e_study.py")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one torch thread per worker: two workers share 2 cores, and torch's OpenMP threads spin-wait when there
        # are more of them than cores (nnU-Net processes get theirs from the workspace's environment)
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_xdist_make_scheduler(config, log):
    """Each test module is one unit of work (its module fixtures built once), and the modules of
    :data:`SHARING_MODULES` are one unit together (pytest-xdist's ``loadgroup`` marks do not reach its scheduler under
    pytest 9: the scope is computed here from the node id instead)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "shared-session-fixtures" if path in SHARING_MODULES else path

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    missing = sorted({item.nodeid.split("::", 1)[0] for item in items
                      if any(name in item.fixturenames for name in SHARED_SESSION_FIXTURES)} - set(SHARING_MODULES))
    if missing:
        raise pytest.UsageError(f"{missing} use a fixture of {SHARED_SESSION_FIXTURES}: add them to SHARING_MODULES "
                                f"in tests/conftest.py, so that the fixture is built in one pytest-xdist worker only")


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        # one torch thread per training run: bit-reproducible under any load (runtime.apply_cpu_threads), and two
        # test workers (scripts/test.sh) do not oversubscribe two cores
        self.env = nnunet_environment(root, defaults=SMALL_MACHINE, extra={CPU_THREADS_VAR: "1"})
        self.logs = root / "logs"
        self.n_logs = 0
        self.extra_datasets: dict[int, str] = {}  # more targets some test modules add (id -> name)

    # -- running programs -------------------------------------------------
    def run(self, args, what: str, train: bool = False) -> float:
        self.n_logs += 1
        log = self.logs / f"{self.n_logs:03d}_{Path(str(args[0])).name}.log"
        return run_step(args, env=self.env, log=log, what=what, extra_env=TRAIN_ENV if train else None)

    def run_expect_failure(self, args, train: bool = False, extra_env: dict | None = None):
        import subprocess
        from nnunet_transfer.pipeline import executable

        env = {**self.env, **(TRAIN_ENV if train else {}), **(extra_env or {})}
        return subprocess.run([executable(args[0]), *map(str, args[1:])], env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)

    def refusals(self, commands: list[list]) -> list[str]:
        """What ``nnUNetv2_train`` prints for each of these refused command lines, all built in one process
        by nnU-Net's own ``get_trainer_from_args`` (tests/refuse_many.py says how, and why). A command line
        that was not refused while the trainer was built fails the test here."""
        import subprocess
        import sys
        import tempfile

        argvs = [["nnUNetv2_train", *map(str, c[1:])] for c in commands]
        assert all(str(c[0]) == "nnUNetv2_train" for c in commands), commands
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "refusals.json"
            proc = subprocess.run([sys.executable, str(Path(__file__).with_name("refuse_many.py")), str(out)],
                                  input=json.dumps(argvs), env={**self.env, **TRAIN_ENV}, capture_output=True,
                                  text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            results = json.loads(out.read_text())
        for r in results:
            assert r["refused"], f"not refused while nnU-Net built the trainer: {' '.join(r['argv'])}"
        return [r["stderr"] for r in results]

    def configure(self, dataset, base: str, new: str, settings: dict, force: bool = True, **kw) -> None:
        from nnunet_transfer.plans.configure import configure

        configure(dataset, base=base, new=new, settings=settings, force=force, **kw)

    def configure_primus(self, dataset, base: str, new: str, settings: dict, *, patch=(16, 16, 16),
                         batch_size: int = 2, **arch) -> None:
        """A tiny Primus configuration (embed_dim 48, 2 heads, 4 transformer blocks, 8³ patch embedding; ``arch``
        overrides) inheriting ``base``'s preprocessed data."""
        from nnunet_transfer.plans.primus import configure_primus, primus_architecture

        architecture = primus_architecture(**{"embed_dim": 48, "eva_depth": 4, "eva_numheads": 2,
                                              "patch_embed_size": (8, 8, 8), **arch})
        configure_primus(dataset, base=base, new=new, architecture=architecture, patch=patch, batch_size=batch_size,
                         settings=settings, force=True)

    def write_configuration(self, dataset, base: str, new: str, settings: dict) -> None:
        """Write a configuration into the plans WITHOUT configure's validation (to test the trainers' own checks)."""
        path = self.root / "preprocessed" / self.dataset_name(dataset) / "nnUNetPlans.json"
        plans = json.loads(path.read_text())
        plans["configurations"][new] = {"inherits_from": base, "nnunet_transfer": settings}
        path.write_text(json.dumps(plans, indent=2))

    @contextlib.contextmanager
    def unchecked_configurations(self, dataset, base: str, configurations: dict[str, dict]):
        """These configurations in the plans, unvalidated, for the duration of the block; the plans file is
        restored byte for byte afterwards."""
        path = self.root / "preprocessed" / self.dataset_name(dataset) / "nnUNetPlans.json"
        before = path.read_bytes()
        try:
            for name, settings in configurations.items():
                self.write_configuration(dataset, base, name, settings)
            yield
        finally:
            path.write_bytes(before)

    def train(self, dataset, configuration: str, trainer: str, *, pretrained=None, cont=False,
              fold=0) -> Path:
        self.run(train_args(dataset, configuration, fold, trainer, pretrained=pretrained, cont=cont),
                 f"train {trainer} {configuration}", train=True)
        return self.fold_folder(dataset, configuration, trainer, fold)

    def train_compiled(self, dataset, configuration: str, trainer: str, *, pretrained=None, cont=False,
                       fold=0) -> Path:
        """``nnUNetv2_train`` with nnU-Net's torch.compile path forced on the CPU (tests/train_compiled.py says
        how): nnU-Net's own ``run_training_entry`` with the same command line."""
        import subprocess
        import sys

        args = train_args(dataset, configuration, fold, trainer, pretrained=pretrained, cont=cont)[1:]
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("train_compiled.py")), *map(str, args)],
                              env={**self.env, **TRAIN_ENV}, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return self.fold_folder(dataset, configuration, trainer, fold)

    def fold_folder(self, dataset, configuration: str, trainer: str, fold=0) -> Path:
        name = self.dataset_name(dataset)
        return self.root / "results" / name / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"

    def predict(self, dataset, configuration: str, trainer: str, out: Path, processes: int = 0) -> Path:
        """``nnUNetv2_predict`` on the dataset's imagesTs. ``processes=0`` is nnU-Net's sequential mode
        (``-npp 0 -nps 0``: no worker processes, each of which would import torch again); 1 takes its
        default path with preprocessing and export workers."""
        name = self.dataset_name(dataset)
        self.run(["nnUNetv2_predict", "-i", self.root / "raw" / name / "imagesTs", "-o", out, "-d", dataset,
                  "-c", configuration, "-f", 0, "-tr", trainer, "-device", "cpu", "-npp", processes,
                  "-nps", processes, "--disable_tta", "--disable_progress_bar"], f"predict {trainer}")
        return out

    def add_target(self, dataset_id: int, name: str, domain=None, **generate) -> Path:
        """Generate target DATASET_ID (``make_dataset(..., TARGET, n_test=0, physical_size=32, **generate)``; another
        ``domain`` of nnunet_transfer.data if given), give it the source's plans (``plans transfer``), preprocess it,
        and know it by name from then on."""
        from nnunet_transfer.data import TARGET, make_dataset

        folder = make_dataset(self.root / "raw", dataset_id, name, domain or TARGET, **{"n_test": 0, "physical_size": 32.0,
                                                                             **generate})
        self.extra_datasets[dataset_id] = folder.name
        self.run(["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", dataset_id, "-np", 1],
                 f"plans transfer {dataset_id}")
        self.run(["nnUNetv2_preprocess", "-d", dataset_id, "-plans_name", "nnUNetPlans", "-c", "3d_fullres",
                  "-np", 1], f"preprocess {dataset_id}")
        return folder

    def alias_target(self, dataset_id: int, name: str, *, of: int) -> Path:
        """Dataset DATASET_ID: dataset OF's raw cases (linked) and preprocessed data (copied, no splits files)
        under another id, known by name from then on; no second preprocessing."""
        import shutil

        source = self.dataset_name(of)
        alias = f"Dataset{dataset_id:03d}_{name}"
        raw = self.root / "raw" / alias
        for sub in ("imagesTr", "labelsTr"):
            (raw / sub).mkdir(parents=True)
            for f in (self.root / "raw" / source / sub).iterdir():
                (raw / sub / f.name).symlink_to(f)
        shutil.copy(self.root / "raw" / source / "dataset.json", raw / "dataset.json")
        pre = self.root / "preprocessed"
        shutil.copytree(pre / source, pre / alias, ignore=shutil.ignore_patterns("splits_*"))
        plans = json.loads((pre / alias / "nnUNetPlans.json").read_text())
        plans["dataset_name"] = alias
        (pre / alias / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
        self.extra_datasets[dataset_id] = alias
        return raw

    def dataset_name(self, dataset) -> str:
        return {SOURCE_ID: self.source, TARGET_ID: self.target, **self.extra_datasets}[int(dataset)]

    @property
    def source_checkpoint(self) -> Path:
        return self.fold_folder(SOURCE_ID, TINY, "nnUNetTrainerTransferBase") / "checkpoint_final.pth"

    def plans(self, dataset) -> dict:
        return json.loads((self.root / "preprocessed" / self.dataset_name(dataset) / "nnUNetPlans.json")
                          .read_text())

    # -- the shared setup ---------------------------------------------------
    def build(self) -> "Workspace":
        self.source, self.target = make_transfer_pair(self.root / "raw", source_id=SOURCE_ID,
                                                      target_id=TARGET_ID, n_source=6, n_target=6,
                                                      n_test=2, seed=0, physical_size=32.0)
        self.run(["nnUNetv2_plan_and_preprocess", "-d", SOURCE_ID, "-c", "3d_fullres", "-np", 1,
                  "-npfp", 1], "plan source")
        self.configure(SOURCE_ID, "3d_fullres", TINY, PRETRAIN_SETTINGS, features="8,16,32",
                       patch="32,32,32", batch_size=2)
        self.train(SOURCE_ID, TINY, "nnUNetTrainerTransferBase")
        self.run(["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", TARGET_ID, "-np", 1],
                 "plans transfer")
        self.run(["nnUNetv2_preprocess", "-d", TARGET_ID, "-plans_name", "nnUNetPlans", "-c", "3d_fullres",
                  "-np", 1], "preprocess target")
        return self


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("nnunet_ws")
    ws = Workspace(root)
    # in-process API calls (configure, analysis) read the same folders as the subprocesses
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", CPU_THREADS_VAR):
        os.environ[var] = ws.env[var]
    return ws.build()


def assert_one_line_error(printed: str, message: str) -> None:
    """PRINTED is one ``nnunet_transfer: error:`` line that contains MESSAGE."""
    assert printed.startswith("nnunet_transfer: error: ") and printed.count("\n") == 1, printed[-3000:]
    assert message in printed, printed


def load_checkpoint(path: Path) -> dict:
    """What our trainers and nnU-Net wrote, read without the opt-in: it must never need to run code."""
    return read_checkpoint(path, trust=False)


def predict_with_network(net, fold, configuration: str, trainer: str, images, out):
    """Predict IMAGES into OUT (created) with NET as it is (no checkpoint file), through nnU-Net's own predictor
    and the fold's plans and dataset.json, probabilities saved: what a stock ``nnUNetv2_predict`` of the saved
    checkpoint must reproduce. Returns OUT."""
    import json as _json

    import torch as _torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_transfer.policies.lora import training_form

    with training_form(net):
        params = {k: v.clone() for k, v in net.state_dict().items()}  # W0, A, B: loaded exactly
    pm = PlansManager(_json.loads((fold.parent / "plans.json").read_text()))
    predictor = nnUNetPredictor(use_mirroring=False, device=_torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net, pm, pm.get_configuration(configuration), [params],
                                    _json.loads((fold.parent / "dataset.json").read_text()), trainer, None)
    out.mkdir()
    predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=True)
    return out


def assert_same_probabilities(stock, adapted, *, cases: int, tol: float = 1e-5) -> None:
    """The two prediction folders hold the same CASES cases and their saved probabilities agree within TOL."""
    import numpy as _np

    names = sorted(p.name for p in stock.glob("*.npz"))
    assert len(names) == cases and names == sorted(p.name for p in adapted.glob("*.npz"))
    for name in names:
        a, b = _np.load(stock / name)["probabilities"], _np.load(adapted / name)["probabilities"]
        assert _np.abs(a - b).max() < tol, name


# --------------------------------------------------------------------------- the smoke studies' data and runs
# Session-scoped so that more than one module analyses the same real runs: tests/test_e2e_study.py checks the
# Karimi smoke study itself (kill, resume, SLURM path, report), tests/test_e2e_analyze.py runs every
# ``nnunet_transfer analyze`` study on its four finished runs (2 R.I., 2 T.L., snapshots every epoch) instead of
# training four runs of its own.
EXAMPLES = Path(__file__).parents[1] / "examples"
# datasets of the studies (912: held-out test set, shared by the Karimi and Sagie smoke studies, whose splits
# are identical; 913: the same images under another id for Amiri's cross-validation): a study writes its
# dataset's splits_final.json, which would change every other test's folds on the shared target 902
FIXED, CV = 912, 913


EVAL_ID = 911  # tests/test_e2e_experiments.py's dataset (its own splits file)


@pytest.fixture(scope="session")
def smoke_data(workspace):
    """Target 912 (10 cases, preprocessed with the source's plans) and, made from it before anything else writes
    into it, 913 and 911: the same cases and preprocessed data under other ids, each with a splits file of its own
    (913: Amiri's cross-validation; 911: tests/test_e2e_experiments.py's ``splits``); no second preprocessing."""
    ws = workspace
    ws.add_target(FIXED, "StudySmoke", n_train=10, seed=12)
    ws.alias_target(CV, "StudySmokeCV", of=FIXED)
    ws.alias_target(EVAL_ID, "EvalSplits", of=FIXED)
    return ws


def copy_example(name: str, dest: Path) -> Path:
    """The shipped smoke file, unchanged, in a folder of the test's (its output is relative to it)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(EXAMPLES / name / "smoke.toml", dest / "smoke.toml"))


def trained_logs(fold: Path) -> list[str]:
    return sorted(p.name for p in fold.glob("training_log_*.txt"))


def final_facts(study, runs) -> dict:
    from nnunet_transfer.study.state import file_stamp, results_folder, sha256

    out = {}
    for r in runs:
        fold = results_folder(study, r)
        if (fold / "checkpoint_final.pth").is_file():
            out[r.id] = (file_stamp(fold / "checkpoint_final.pth"), sha256(fold / "checkpoint_final.pth"),
                         trained_logs(fold))
    return out


@pytest.fixture(scope="session")
def karimi(smoke_data, tmp_path_factory):
    """examples/karimi/smoke.toml run whole by ``study run``, killed in the middle of a run and resumed (locally,
    then the rest as SLURM jobs through submitit's LocalExecutor), then reported. The facts recorded along the
    way are tests/test_e2e_study.py's to check; its four finished runs are never trained again by anyone."""
    import signal
    import subprocess
    import time

    from nnunet_transfer.cli.main import main
    from nnunet_transfer.pipeline import executable
    from nnunet_transfer.study.plan import prepare
    from nnunet_transfer.study.state import results_folder, run_dir
    from nnunet_transfer.study.status import study_status

    ws = smoke_data
    path = copy_example("karimi", tmp_path_factory.mktemp("karimi"))
    plan = prepare(path)
    study, runs = plan.study, plan.runs
    assert len(runs) == 4  # 2 strategies x 2 sizes
    log = open(path.parent / "study_run.log", "w")
    proc = subprocess.Popen([executable("nnunet_transfer"), "study", "run", str(path)], env=ws.env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    killed = None
    deadline = time.monotonic() + 1800  # a guard against a hang, not a measurement
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            done = [r for r in runs if (run_dir(study, r) / "pred").is_dir()]
            for r in runs:
                fold = results_folder(study, r)
                logs = list(fold.glob("training_log_*.txt")) if done else []
                # "Epoch 1" is printed after epoch 0's checkpoint_latest was written in full
                if logs and not (fold / "checkpoint_final.pth").exists() and "Epoch 1" in logs[0].read_text():
                    os.killpg(proc.pid, signal.SIGSTOP)  # freeze, look again, then kill: never mid-final
                    if not (fold / "checkpoint_final.pth").exists():
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = r
                        break
                    os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed is not None, f"study run ended before a run could be killed mid-run: {path.parent / 'study_run.log'}"
    fold = results_folder(study, killed)
    latest = load_checkpoint(fold / "checkpoint_latest.pth")
    facts = {"path": path, "study": study, "runs": runs, "killed": killed,
             "latest_epoch": latest["current_epoch"], "latest_log": latest["logging"],
             "before": final_facts(study, runs), "status_after_kill": {p.run.id: p for p in study_status(path).progress}}
    # 1. rerun the killed run here (--executor local, the default)
    assert main(["study", "run", str(path), "--only", killed.id]) == 0
    facts["after_local"] = final_facts(study, runs)
    # 2. the rest as SLURM jobs: submitit's LocalExecutor runs RunJob in local processes
    pending = [r for r in runs if r.id not in facts["after_local"]]
    facts["pending"] = pending
    assert main(["study", "run", str(path), "--executor", "slurm", "--cluster", "local", "--wait"]) == 0
    facts["after_slurm"] = final_facts(study, runs)
    # 3. a third run has nothing left to do
    assert main(["study", "run", str(path)]) == 0
    facts["after_all"] = final_facts(study, runs)
    assert main(["study", "report", str(path), "-o", str(path.parent / "report")]) == 0
    facts["report"] = path.parent / "report"
    return facts

