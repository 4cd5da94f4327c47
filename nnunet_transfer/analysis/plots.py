"""PNG figures of the analysis studies (matplotlib, Agg canvas: no display, no pyplot global state).

Every similarity is drawn with its null baseline (dashed, same colour) so a reader sees how far a
value is above what unrelated layers would score with the same samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def plot_layer_lines(path: str | Path, layers: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     *, measure: str, title: str) -> Path:
    """One line per series over the layers (x), its null dashed. ``series``: name -> (values, nulls)."""
    fig = _figure(max(6.0, 0.7 * len(layers) + 3), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(layers))
    for (name, (vals, nulls)), c in zip(series.items(), _colors(len(series))):
        ax.plot(x, vals, "o-", color=c, label=name)
        ax.plot(x, nulls, ":", color=c, alpha=0.7)
    ax.set_xticks(x, layers, rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(measure)
    ax.set_title(title + "  (dotted: null baseline)")
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_evolution(path: str | Path, epochs: Sequence[int], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   *, convergence: int, dice: Sequence[tuple[int, float]], measure: str, title: str,
                   dice_label: str = "val. pseudo-Dice") -> Path:
    """Karimi et al. Fig. 6–7: similarity of each snapshot's layer to the same layer at convergence."""
    fig = _figure(7.5, 6.0)
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 1])
    ax = fig.add_subplot(gs[0])
    for (name, (vals, nulls)), c in zip(series.items(), _colors(len(series))):
        ax.plot(epochs, vals, "o-", ms=3, color=c, label=name)
        ax.plot(epochs, nulls, ":", color=c, alpha=0.6)
    ax.axvline(convergence, color="k", lw=0.8, ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"{measure} to epoch {convergence}")
    ax.set_title(title + "  (dotted: null baseline)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax2 = fig.add_subplot(gs[1], sharex=ax)
    if dice:
        e, d = zip(*dice)
        ax2.plot(e, d, "k.-", ms=3)
    ax2.axvline(convergence, color="k", lw=0.8, ls="--")
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(dice_label)
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(path: str | Path, layers: Sequence[str], bars: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              *, nulls: Sequence[float] | None, ylabel: str, title: str, ylim: tuple[float, float] | None = (0, 1.02)) -> Path:
    """Grouped bars per layer: ``bars`` name -> (means, stds); the mean null baseline as a dashed step."""
    fig = _figure(max(6.0, 0.9 * len(layers) * max(1, len(bars)) / 2 + 3), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(layers))
    width = 0.8 / max(len(bars), 1)
    for k, ((name, (means, stds)), c) in enumerate(zip(bars.items(), _colors(len(bars)))):
        ax.bar(x - 0.4 + width * (k + 0.5), means, width, yerr=stds, color=c, label=name, capsize=2)
    if nulls is not None:
        ax.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[nulls, nulls[-1]], where="post", color="k", ls="--",
                lw=0.8, label="null baseline")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, layers, rotation=30, ha="right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_kernels(path: str | Path, start: np.ndarray, end: np.ndarray, labels: Sequence[str], *, title: str) -> Path:
    """Karimi et al. Fig. 8–9: filters (K, h, w) at start, end and their difference (rows)."""
    k = start.shape[0]
    fig = _figure(1.3 * k + 1, 4.3)
    lim = float(max(np.abs(start).max(), np.abs(end).max(), 1e-12))
    dlim = float(max(np.abs(end - start).max(), 1e-12))
    rows = (("start", start, lim), ("end", end, lim), ("end - start", end - start, dlim))
    for r, (name, arr, m) in enumerate(rows):
        for i in range(k):
            ax = fig.add_subplot(3, k, r * k + i + 1)
            ax.imshow(arr[i], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[i], fontsize=6)
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_feature_maps(path: str | Path, image: np.ndarray, start: np.ndarray, end: np.ndarray,
                      labels: Sequence[str], *, title: str) -> Path:
    """Karimi et al. Fig. 10: the input slice, then K feature maps (K, h, w) at start, end, difference."""
    k = start.shape[0]
    fig = _figure(1.5 * (k + 1) + 1, 4.6)
    diff = end - start
    dlim = float(max(np.abs(diff).max(), 1e-12))
    ax = fig.add_subplot(3, k + 1, 1)
    ax.imshow(image, cmap="gray")
    ax.set_title("input", fontsize=7)
    ax.axis("off")
    for r, (name, arr) in enumerate((("start", start), ("end", end), ("end - start", diff))):
        for i in range(k):
            ax = fig.add_subplot(3, k + 1, r * (k + 1) + i + 2)
            if r < 2:
                lo = float(min(start[i].min(), end[i].min()))
                hi = float(max(start[i].max(), end[i].max(), lo + 1e-12))
                ax.imshow(arr[i], cmap="viridis", vmin=lo, vmax=hi)
            else:
                ax.imshow(arr[i], cmap="RdBu_r", vmin=-dlim, vmax=dlim)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[i], fontsize=6)
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
