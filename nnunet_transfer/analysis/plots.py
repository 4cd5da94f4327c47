"""PNG figures of the analysis studies, drawn through :mod:`nnunet_transfer.figures` (one size and style,
all text inside the canvas).

Every similarity is drawn with its null baseline (dotted, same colour) so a reader sees how far a
value is above what unrelated layers would score with the same samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_transfer.figures import SINGLE, colors, figure

NULL_ENTRY = "null baseline (dotted, same colour)"


def _null_handle():
    from matplotlib.lines import Line2D

    return Line2D([], [], color="0.4", ls=":", label=NULL_ENTRY)


def plot_layer_lines(path: str | Path, layers: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     *, measure: str, title: str) -> Path:
    """One line per series over the layers (x), its null dotted. ``series``: name -> (values, nulls)."""
    with figure(path) as p:
        ax = p.fig.add_subplot(1, 1, 1)
        x = np.arange(len(layers))
        for (name, (vals, nulls)), c in zip(series.items(), colors(len(series))):
            ax.plot(x, vals, "o-", color=c, label=name)
            ax.plot(x, nulls, ":", color=c, alpha=0.7)
        p.categories(ax, x, layers)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(measure)
        p.title(ax, title)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] if len(series) <= 12 else []  # more: colours only
        p.legend(handles + [_null_handle()], where="below")
    return Path(path)


def plot_evolution(path: str | Path, epochs: Sequence[int], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   *, convergence: int, dice: Sequence[tuple[int, float]], measure: str, title: str,
                   dice_label: str = "val. pseudo-Dice") -> Path:
    """Karimi et al. Fig. 6–7: similarity of each snapshot's layer to the same layer at convergence."""
    from matplotlib.ticker import MaxNLocator

    with figure(path, size=(SINGLE[0], 6.0)) as p:
        gs = p.fig.add_gridspec(2, 1, height_ratios=[3, 1])
        ax = p.fig.add_subplot(gs[0])
        for (name, (vals, nulls)), c in zip(series.items(), colors(len(series))):
            ax.plot(epochs, vals, "o-", ms=3, color=c, label=name)
            ax.plot(epochs, nulls, ":", color=c, alpha=0.6)
        ax.axvline(convergence, color="k", lw=0.8, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"{measure} to epoch {convergence}")
        p.title(ax, title)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelbottom=False)  # shared with the panel below
        ax2 = p.fig.add_subplot(gs[1], sharex=ax)
        if dice:
            e, d = zip(*dice)
            ax2.plot(e, d, "k.-", ms=3)
        ax2.axvline(convergence, color="k", lw=0.8, ls="--")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(dice_label)
        ax2.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        p.legend(handles + [_null_handle()], where="right")
    return Path(path)


def plot_bars(path: str | Path, layers: Sequence[str], bars: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              *, nulls: Sequence[float] | None, ylabel: str, title: str, ylim: tuple[float, float] | None = (0, 1.02)) -> Path:
    """Grouped bars per layer: ``bars`` name -> (means, stds); the mean null baseline as a dashed step."""
    with figure(path, size=(max(SINGLE[0], 0.22 * len(layers) * max(1, len(bars)) + 1.5), SINGLE[1])) as p:
        ax = p.fig.add_subplot(1, 1, 1)
        x = np.arange(len(layers))
        width = 0.8 / max(len(bars), 1)
        for k, ((name, (means, stds)), c) in enumerate(zip(bars.items(), colors(len(bars)))):
            ax.bar(x - 0.4 + width * (k + 0.5), means, width, yerr=stds, color=c, label=name, capsize=2)
        if nulls is not None:
            ax.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[nulls, nulls[-1]], where="post", color="k", ls="--",
                    lw=0.8, label="null baseline")
        ax.axhline(0, color="k", lw=0.5)
        p.categories(ax, x, layers)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_ylabel(ylabel)
        p.title(ax, title)
        ax.grid(alpha=0.3, axis="y")
        p.legend(where="right")
    return Path(path)


def _image_cell(p, rows: int, cols: int, index: int, *, row: str | None, column: str | None):
    """One image panel of a grid, without ticks; the row's name on the first column, the column's on the top row."""
    ax = p.fig.add_subplot(rows, cols, index)
    ax.set_xticks([])
    ax.set_yticks([])
    if column is not None:
        p.title(ax, column, fontsize=7)
    if row is not None:
        ax.set_ylabel(row, fontsize=8)
    return ax


def plot_kernels(path: str | Path, start: np.ndarray, end: np.ndarray, labels: Sequence[str], *, title: str) -> Path:
    """Karimi et al. Fig. 8–9: filters (K, h, w) at start, end and their difference (rows)."""
    k = start.shape[0]
    lim = float(max(np.abs(start).max(), np.abs(end).max(), 1e-12))
    dlim = float(max(np.abs(end - start).max(), 1e-12))
    rows = (("start", start, lim), ("end", end, lim), ("end - start", end - start, dlim))
    with figure(path, size=(1.3 * k + 1, 4.3)) as p:
        for r, (name, arr, m) in enumerate(rows):
            for i in range(k):
                ax = _image_cell(p, 3, k, r * k + i + 1, row=name if i == 0 else None,
                                 column=labels[i] if r == 0 else None)
                ax.imshow(arr[i], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
        p.suptitle(title, fontsize=10)
    return Path(path)


def plot_feature_maps(path: str | Path, image: np.ndarray, start: np.ndarray, end: np.ndarray,
                      labels: Sequence[str], *, title: str) -> Path:
    """Karimi et al. Fig. 10: the input slice, then K feature maps (K, h, w) at start, end, difference."""
    k = start.shape[0]
    diff = end - start
    dlim = float(max(np.abs(diff).max(), 1e-12))
    with figure(path, size=(1.5 * (k + 1) + 1, 4.6)) as p:
        ax = p.fig.add_subplot(3, k + 1, 1)
        ax.imshow(image, cmap="gray")
        p.title(ax, "input", fontsize=7)
        ax.axis("off")
        for r, (name, arr) in enumerate((("start", start), ("end", end), ("end - start", diff))):
            for i in range(k):
                ax = _image_cell(p, 3, k + 1, r * (k + 1) + i + 2, row=name if i == 0 else None,
                                 column=labels[i] if r == 0 else None)
                if r < 2:
                    lo = float(min(start[i].min(), end[i].min()))
                    hi = float(max(start[i].max(), end[i].max(), lo + 1e-12))
                    ax.imshow(arr[i], cmap="viridis", vmin=lo, vmax=hi)
                else:
                    ax.imshow(arr[i], cmap="RdBu_r", vmin=-dlim, vmax=dlim)
        p.suptitle(title, fontsize=10)
    return Path(path)
