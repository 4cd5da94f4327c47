"""Every figure of analyze, compare and the study report keeps its text readable.

Each plotting function is driven with small synthetic inputs that are hard to lay out — names of 30
characters, many strategies / layers / series, long titles — and every figure it saves is measured as it
was saved: each text that was drawn lies inside the canvas (1 px tolerance) and no two tick labels of one
axis overlap. The figures are caught at ``Figure.savefig`` (the call goes through unchanged) and redrawn
once while ``Text.draw`` notes which texts were drawn, so texts that exist but are not drawn (ticks
outside the view, axes switched off) are not measured.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.text import Text

TOL = 1.0  # px


def long_name(kind: str, i: int) -> str:
    """Distinct names of exactly 30 characters, like ``partial_ft_contracting_lr1e-4``."""
    name = f"{kind}_{i:02d}_" + "abcdefghijklmnopqrstuvwxyz0123456789"
    return name[:30]


STRATEGIES = [long_name("strategy", i) for i in range(12)]
LAYERS = [long_name("decoder.stages", i) for i in range(14)]
RUN = "nnUNetTrainerTransferBase_with_a_long_name__nnUNetPlans__3d_fullres/fold_0"


@pytest.fixture
def saved(monkeypatch):
    """Figures as saved: a list of (figure, drawn texts, path) filled by every ``Figure.savefig``."""
    caught = []
    drawing: list[set] = []
    text_draw, savefig = Text.draw, Figure.savefig

    def draw(self, renderer):
        if drawing:
            drawing[-1].add(self)
        return text_draw(self, renderer)

    def save(self, fname, *args, **kwargs):
        out = savefig(self, fname, *args, **kwargs)
        drawing.append(set())
        try:
            self.canvas.draw()  # at the figure's own dpi, as the layout was made
        finally:
            drawn = drawing.pop()
        caught.append((self, drawn, fname))
        return out

    monkeypatch.setattr(Text, "draw", draw)
    monkeypatch.setattr(Figure, "savefig", save)
    return caught


def problems(fig: Figure, drawn: set) -> list[str]:
    """Texts outside the canvas and overlapping tick labels of one axis, as readable lines."""
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    texts = [t for t in fig.findobj(Text) if t in drawn and t.get_visible() and t.get_text().strip()]
    assert texts, "no text was drawn"
    found = []
    for t in texts:
        b = t.get_window_extent(renderer)
        if (b.x0 < canvas.x0 - TOL or b.y0 < canvas.y0 - TOL or b.x1 > canvas.x1 + TOL
                or b.y1 > canvas.y1 + TOL):
            found.append(f"outside the {canvas.width:.0f}x{canvas.height:.0f} px canvas: {t.get_text()!r} at "
                         f"x {b.x0:.0f}..{b.x1:.0f}, y {b.y0:.0f}..{b.y1:.0f}")
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [lab for tick in axis.majorTicks + axis.minorTicks for lab in (tick.label1, tick.label2)
                      if lab in drawn and lab.get_visible() and lab.get_text().strip()]
            for a, b in itertools.combinations([rectangle(lab, renderer) for lab in labels], 2):
                if overlap(a, b):
                    found.append(f"tick labels overlap: {a[0]!r} and {b[0]!r}")
    return found


def rectangle(text: Text, renderer) -> tuple:
    """(text, centre x, y, width, height, angle) of the text's own, possibly rotated, box in pixels.

    A rotated label's window extent is the upright box around it, so two slanted labels can share
    upright boxes without touching: compare the rotated boxes themselves. The centre of the upright box
    is the centre of the rotated one; width and height are measured with the rotation set to 0.
    """
    b = text.get_window_extent(renderer)
    angle = text.get_rotation()
    text.set_rotation(0)
    try:
        flat = text.get_window_extent(renderer)
    finally:
        text.set_rotation(angle)
    return text.get_text(), (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, flat.width, flat.height, math.radians(angle)


def overlap(a: tuple, b: tuple) -> bool:
    """Whether two text boxes overlap by more than TOL (separating axes of both boxes)."""
    _, ax_, ay, aw, ah, at = a
    _, bx, by, bw, bh, bt = b
    dx, dy = bx - ax_, by - ay
    for t in {at, bt}:
        for ux, uy in ((math.cos(t), math.sin(t)), (-math.sin(t), math.cos(t))):
            # half the projections of both boxes onto the axis (ux, uy), against their centres' distance
            ra = (abs(aw * (math.cos(at) * ux + math.sin(at) * uy)) + abs(ah * (-math.sin(at) * ux + math.cos(at) * uy))) / 2
            rb = (abs(bw * (math.cos(bt) * ux + math.sin(bt) * uy)) + abs(bh * (-math.sin(bt) * ux + math.cos(bt) * uy))) / 2
            if abs(dx * ux + dy * uy) >= ra + rb - TOL:
                return False
    return True


def check(saved, paths) -> None:
    assert len(saved) == len(paths), "one figure saved per file"
    bad = []
    for (fig, drawn, _), path in zip(saved, paths):
        bad += [f"{path.name}: {p}" for p in problems(fig, drawn)]
    assert not bad, "\n".join(bad[:20]) + (f"\n... {len(bad) - 20} more" if len(bad) > 20 else "")
    for (fig, _, _), path in zip(saved, paths):  # the file is the figure measured (not cropped: same aspect)
        img = imread(path)
        w, h = fig.get_size_inches()
        assert abs(img.shape[1] / img.shape[0] - w / h) < 0.01, (path.name, img.shape, w, h)


def similarity(n: int, rng) -> tuple[list[float], list[float]]:
    v = rng.uniform(0.4, 1.0, n)
    return list(v), list(v * rng.uniform(0.1, 0.3, n))


# --------------------------------------------------------------------------- analyze
def test_evolution(saved, tmp_path):
    from nnunet_transfer.analysis import plots

    rng = np.random.default_rng(0)
    epochs = list(range(0, 200, 10))
    series = {name: similarity(len(epochs), rng) for name in LAYERS}
    p = plots.plot_evolution(tmp_path / "evolution.png", epochs, series, convergence=120,
                             dice=[(e, 0.5 + e / 500) for e in range(200)], measure="pwcca",
                             title=f"{RUN}: similarity to epoch 120", dice_label="val. pseudo-Dice (EMA)")
    check(saved, [p])


def test_layer_lines(saved, tmp_path):
    from nnunet_transfer.analysis import plots

    rng = np.random.default_rng(1)
    series = {f"{a} vs {b}": similarity(len(LAYERS), rng) for a, b in zip(STRATEGIES[:6], STRATEGIES[6:])}
    p = plots.plot_layer_lines(tmp_path / "compare.png", LAYERS, series, measure="pwcca", title="layer similarity")
    check(saved, [p])


@pytest.mark.parametrize("kind", ["groups", "reuse", "weights"])
def test_bars(saved, tmp_path, kind):
    from nnunet_transfer.analysis import plots

    rng = np.random.default_rng(2)
    n = len(LAYERS)
    if kind == "groups":
        names = [f"{a} / {b}" for a, b in [(STRATEGIES[0], STRATEGIES[0]), (STRATEGIES[0], STRATEGIES[1]),
                                           (STRATEGIES[1], STRATEGIES[1])]]
        bars = {name: (list(rng.uniform(0.3, 1, n)), list(rng.uniform(0, 0.1, n))) for name in names}
        kw = dict(nulls=list(rng.uniform(0, 0.2, n)), ylabel="pwcca",
                  title="within- and between-group similarity (mean ± std over pairs)")
    elif kind == "reuse":
        bars = {name: (list(rng.uniform(-0.2, 1, n)), list(rng.uniform(0, 0.1, n)))
                for name in ("TL", "RI", "reuse = TL − RI")}
        kw = dict(nulls=list(rng.uniform(0, 0.2, n)), ylabel="pwcca", ylim=None,
                  title="feature reuse: pwcca(start, converged)")
    else:
        bars = {name: (list(rng.uniform(0, 2, n)), [0.0] * n)
                for name in ("per filter (mean)", "conv kernels (pooled)", "all parameters (pooled)")}
        kw = dict(nulls=None, ylabel="relative change", ylim=None, title=f"weight change {RUN} → {RUN}")
    p = plots.plot_bars(tmp_path / f"{kind}.png", LAYERS, bars, **kw)
    check(saved, [p])


def test_kernels_and_feature_maps(saved, tmp_path):
    from nnunet_transfer.analysis import plots

    rng = np.random.default_rng(3)
    k = 8
    start, end = rng.normal(size=(k, 3, 3)), rng.normal(size=(k, 3, 3))
    labels = [f"filter {i}" for i in range(k)]
    title = (f"{LAYERS[0]} convs.0.conv: filters (middle slice), per filter 0.123, pooled ‖Δw‖/‖w₀‖ = 0.456")
    a = plots.plot_kernels(tmp_path / "filters.png", start, end, labels, title=title)
    maps = rng.normal(size=(2, k, 16, 16))
    b = plots.plot_feature_maps(tmp_path / "featuremaps.png", rng.normal(size=(16, 16)), maps[0], maps[1],
                                [f"channel {i}" for i in range(k)],
                                title=f"{LAYERS[0]}: feature maps of patch 0 (case_0000_long_identifier), middle slice")
    check(saved, [a, b])


# --------------------------------------------------------------------------- compare
@pytest.mark.parametrize("n_strategies, metrics", [(12, ("dice", "hd95", "assd", "nsd", "precision", "recall",
                                                          "lesion_f1")), (3, ("dice",))])
def test_compare_boxes(saved, tmp_path, n_strategies, metrics):
    from nnunet_transfer.experiments.compare import plot_boxes

    rng = np.random.default_rng(4)
    order = STRATEGIES[:n_strategies]
    values = {s: {(m, 1): rng.uniform(0, 1, 10) for m in metrics} for s in order}
    p = plot_boxes(tmp_path / "boxplot_label1.png", values, order, metrics, 1, "liver_tumour_long_label_name")
    check(saved, [p])


def test_compare_learning_curves(saved, tmp_path):
    from nnunet_transfer.experiments.compare import plot_learning_curves

    curves = {}
    for i, s in enumerate(STRATEGIES):
        curve = [{"epoch": e, "seconds": 30.0 * (e + 1) * (1 + i / 10), "value": 0.8 * (1 - math.exp(-e / (5 + i)))}
                 for e in range(40)]
        curves[s] = {"key": "ema_fg_dice", "curve": curve, "epoch": 20 + i}
    p = plot_learning_curves(tmp_path / "learning_curves.png", curves, STRATEGIES)
    check(saved, [p])


# --------------------------------------------------------------------------- study report
@pytest.mark.parametrize("labels", [[1], [1, 2]])
def test_study_vs_ntrain(saved, tmp_path, labels):
    from nnunet_transfer.study.report import plot_vs_ntrain

    rng = np.random.default_rng(5)
    names = {1: "liver_with_a_long_label_name", 2: "tumour_with_a_long_label_name"}
    points = {(s, lab): [(n, float(rng.uniform(0.3, 0.9)), float(rng.uniform(0, 0.1))) for n in (5, 10, 20, 40)]
              for s in STRATEGIES for lab in labels}
    p = plot_vs_ntrain(tmp_path / "dice_vs_ntrain.png", points, STRATEGIES, labels, names)
    check(saved, [p])


def test_study_sweep(saved, tmp_path):
    from nnunet_transfer.study.report import plot_sweep

    rng = np.random.default_rng(6)
    labels, metrics = [1, 2], ("dice", "precision")
    values = [0, 0.001, 0.01, 0.1, 1, 2, 4, 8, 16, 50, math.inf]
    series = {(str(size), m, lab): list(rng.uniform(0.3, 0.9, len(values)))
              for size in (5, 10, 20, 40) for m in metrics for lab in labels}
    p = plot_sweep(tmp_path / "dice_vs_l2sp_alpha.png", "l2sp_alpha", values, series, labels,
                   {1: "liver_with_a_long_label_name", 2: "tumour_with_a_long_label_name"}, metrics)
    check(saved, [p])
