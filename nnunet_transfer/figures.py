"""Every PNG figure of the package — analyze, compare, the study report — in one size and style, all text inside.

A figure is built in the block of :func:`figure`, which hands out a :class:`Plot`; when the block ends
without an error the figure is laid out (:meth:`Plot.fit`) and written whole or not at all::

    with figure(path, cols=2) as p:
        ax = p.fig.add_subplot(1, 2, 1)
        ax.plot(x, y, label=name)
        p.categories(ax, range(len(names)), names)  # horizontal when they fit, else vertical
        p.title(ax, "a long title ...")              # wrapped to the axes' width
        p.legend(where="right")                      # outside the data, inside the canvas

Layout. Matplotlib's constrained layout places axes, titles, axis labels and the figure legend, but it
does not wrap text, does not turn tick labels, and draws past the canvas when the canvas is too small
for the decorations. :meth:`Plot.fit` therefore measures after each layout pass and corrects: titles
are wrapped (``textwrap``) to the width of their axes (the figure's for the figure title), category
tick labels turn vertical when they do not fit side by side and the figure widens until vertical ones
do, a legend gets more columns (right) or fewer (below) until it fits, and finally the figure grows by
whatever still lies outside the canvas.

No pyplot: a ``Figure`` on an Agg canvas, so no display is needed and no figure stays registered in a
global manager; the style is an ``rc_context`` around building and saving only. The file is written
beside its place and renamed into it, as :mod:`nnunet_transfer.fileio` does for text.
"""
from __future__ import annotations

import math
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from nnunet_transfer.fileio import atomic_path

DPI = 110
SINGLE = (7.5, 4.5)  # inches: a figure of one plot
PANEL = (4.2, 3.4)  # inches per plot of a grid
SHORT_LABEL = 4  # tick labels up to this many line heights wide stay horizontal (the canvas widens instead)
PLOT_AREA = 0.7  # the plots keep at least this share of the planned width and height; the canvas grows for the rest
MAX_INCHES = 60.0  # a figure never grows past this (6600 px): beyond, wrapping and turning are all there is
STYLE = {"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 11,
         "grid.alpha": 0.3, "legend.framealpha": 0.9}
_PAD = 3  # px kept free at the canvas edge and between labels


@contextmanager
def figure(path: str | Path, *, rows: int = 1, cols: int = 1,
           size: tuple[float, float] | None = None) -> Iterator["Plot"]:
    """A :class:`Plot` to draw on; written to PATH (PNG) when the block ends without an error.

    ``size`` (inches) defaults to :data:`SINGLE` for one plot and :data:`PANEL` per plot of a
    ``rows`` × ``cols`` grid; the figure grows beyond it where text needs room (:meth:`Plot.fit`).
    """
    from matplotlib import rc_context

    if size is None:
        size = SINGLE if rows == cols == 1 else (PANEL[0] * cols, PANEL[1] * rows)
    with rc_context(STYLE):
        plot = Plot(size)
        yield plot
        plot.fit()
        save(plot.fig, path)


def save(fig, path: str | Path) -> Path:
    """Write FIG as a PNG to PATH through a temporary file beside it and a rename."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def colors(n: int) -> list:
    """N distinguishable colours: tab10, tab20, then evenly spaced along viridis."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


class Plot:
    """A figure with constrained layout on an Agg canvas, and what :meth:`fit` must keep readable."""

    def __init__(self, size: tuple[float, float]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        self._planned = tuple(size)
        FigureCanvasAgg(self.fig)
        self._titles: list[tuple] = []  # (Text, full text, axes or None for the figure title)
        self._categories: list[tuple] = []  # (axes, positions)
        self._legends: list[dict] = []  # handles, labels, where, ncols, artist

    # ------------------------------------------------------------------ what a plotting function calls
    def title(self, ax, text: str, **kwargs):
        """The axes' title, wrapped to the axes' width at layout."""
        t = ax.set_title(text, **kwargs)
        self._titles.append((t, text, ax))
        return t

    def suptitle(self, text: str, **kwargs):
        """The figure's title, wrapped to the figure's width at layout."""
        t = self.fig.suptitle(text, **kwargs)
        self._titles.append((t, text, None))
        return t

    def categories(self, ax, positions: Sequence[float], labels: Sequence[str]) -> None:
        """Named x ticks: horizontal when they fit side by side, vertical otherwise (not slanted: a
        vertical label is as narrow as a label gets, so spacing them one line height apart suffices)."""
        positions = [float(p) for p in positions]
        ax.set_xticks(positions, [str(s) for s in labels])
        ax.tick_params(axis="x", labelrotation=0)
        self._categories.append((ax, positions))

    def legend(self, handles=None, labels=None, *, where: str = "right"):
        """One legend for the figure, outside the plots: ``right`` (columns added while it is taller than
        the figure) or ``below`` (columns removed while it is wider). Default entries: every axes' labelled
        artists, each label once. Returns None when there is nothing to list."""
        if where not in ("right", "below"):
            raise ValueError(f"legend where must be 'right' or 'below', got {where!r}")
        if handles is None:
            handles, labels, seen = [], [], set()
            for ax in self.fig.axes:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in seen:
                        seen.add(lab)
                        handles.append(h)
                        labels.append(lab)
        if not handles:
            return None
        if labels is None:
            labels = [h.get_label() for h in handles]
        entry = {"handles": list(handles), "labels": list(labels), "where": where,
                 "ncols": 1 if where == "right" else len(handles), "artist": None}
        self._legends.append(entry)
        return self._place_legend(entry)

    def _place_legend(self, entry: dict):
        # a Legend lays out its columns once, when made (set_ncols only stores the number): make it anew
        if entry["artist"] is not None:
            entry["artist"].remove()
        entry["artist"] = self.fig.legend(entry["handles"], entry["labels"], ncols=entry["ncols"],
                                          loc="outside right upper" if entry["where"] == "right"
                                          else "outside lower center")
        return entry["artist"]

    # ------------------------------------------------------------------ layout
    def fit(self, rounds: int = 12) -> None:
        """Lay out, measure, correct (module docstring) until every text is inside the canvas."""
        fig = self.fig
        for _ in range(rounds):
            fig.draw_without_rendering()  # runs the constrained layout, places ticks and legends
            r = fig.canvas.get_renderer()
            # one correction per pass: each changes the layout the next ones measure
            if (self._wrap_titles(r) or self._fit_legends(r) or self._turn_categories(r) or self._keep_plot_area()
                    or self._grow(r)):
                continue
            return
        warnings.warn(f"figure layout did not settle in {rounds} passes; some text may lie outside the canvas",
                      RuntimeWarning, stacklevel=2)

    def _wrap_titles(self, renderer) -> bool:
        changed = False
        for t, full, ax in self._titles:
            avail = (ax.get_window_extent(renderer).width if ax is not None else self.fig.bbox.width) - 2 * _PAD
            before = t.get_text()
            t.set_text(full)
            width = t.get_window_extent(renderer).width
            text, chars = full, max(len(line) for line in full.splitlines() or [""])
            while width > avail and chars > 8:
                chars = max(8, min(chars - 1, int(chars * avail / width)))
                text = "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in full.splitlines())
                t.set_text(text)
                width = t.get_window_extent(renderer).width
            changed |= text != before
        return changed

    def _fit_legends(self, renderer) -> bool:
        changed = False
        avail_w, avail_h = self.fig.bbox.width - 2 * _PAD, self.fig.bbox.height - 2 * _PAD
        for entry in self._legends:
            box, ncols, n = entry["artist"].get_window_extent(renderer), entry["ncols"], len(entry["handles"])
            if entry["where"] == "right" and box.height > avail_h and ncols < n:
                entry["ncols"] = min(n, max(ncols + 1, math.ceil(ncols * box.height / avail_h)))
            elif entry["where"] == "below" and box.width > avail_w and ncols > 1:
                entry["ncols"] = max(1, min(ncols - 1, int(ncols * avail_w / box.width)))
            if entry["ncols"] != ncols:
                self._place_legend(entry)
                changed = True
        return changed

    def _turn_categories(self, renderer) -> bool:
        """Short labels (numbers) stay horizontal and the canvas widens; longer ones turn vertical, and
        the canvas widens until vertical ones stand apart."""
        changed = False
        for ax, positions in self._categories:
            labels = [t for t in ax.get_xticklabels() if t.get_text()]
            if len(labels) < 2:
                continue
            x = ax.transData.transform([(p, 0) for p in positions])[:, 0]
            spacing = float(min(abs(b - a) for a, b in zip(x[:-1], x[1:])))
            boxes = [t.get_window_extent(renderer) for t in labels]
            if labels[0].get_rotation() == 90:
                need = max(b.width for b in boxes) + _PAD  # a vertical label's width is its line height
            else:
                need = max(b.width for b in boxes) + _PAD
                if need > spacing and need > SHORT_LABEL * max(b.height for b in boxes):
                    ax.tick_params(axis="x", labelrotation=90)
                    changed = True
                    continue
            if spacing < need:
                w, h = self.fig.get_size_inches()
                grown = min(MAX_INCHES, w * need / spacing + 0.1)
                if grown > w:
                    self.fig.set_size_inches(grown, h)
                    changed = True
        return changed

    def _keep_plot_area(self) -> bool:
        """Grow the canvas where labels and legends left a plot less than PLOT_AREA of its planned size.

        Planned: the plot's grid cell in the planned canvas without the layout; a deficit of d inches in a
        cell that shares a fraction f of the grid grows the canvas by d / f. Image grids keep their size.
        """
        w, h = self.fig.get_size_inches()
        sp = self.fig.subplotpars
        grow_w = grow_h = 0.0
        for ax in self.fig.axes:
            ss = ax.get_subplotspec()
            if ss is None or ax.get_images():
                continue
            cell, pos = ss.get_position(self.fig), ax.get_position()
            share_w, share_h = cell.width / (sp.right - sp.left), cell.height / (sp.top - sp.bottom)
            grow_w = max(grow_w, (PLOT_AREA * cell.width * self._planned[0] - pos.width * w) / share_w)
            grow_h = max(grow_h, (PLOT_AREA * cell.height * self._planned[1] - pos.height * h) / share_h)
        grown = (min(MAX_INCHES, w + max(grow_w, 0.0)), min(MAX_INCHES, h + max(grow_h, 0.0)))
        if grown[0] - w < 0.05 and grown[1] - h < 0.05:
            return False
        self.fig.set_size_inches(*grown)
        return True

    def _grow(self, renderer) -> bool:
        """Grow the canvas by what lies outside it (inches), so the next layout pass can fit it."""
        tight = self.fig.get_tightbbox(renderer)
        w, h = self.fig.get_size_inches()
        pad = _PAD / DPI
        out_x = max(0.0, -tight.x0) + max(0.0, tight.x1 - w)
        out_y = max(0.0, -tight.y0) + max(0.0, tight.y1 - h)
        if out_x < 0.5 / DPI and out_y < 0.5 / DPI:
            return False
        new = (min(MAX_INCHES, w + (out_x + 2 * pad if out_x else 0)), min(MAX_INCHES, h + (out_y + 2 * pad if out_y else 0)))
        if math.isclose(new[0], w) and math.isclose(new[1], h):
            return False
        self.fig.set_size_inches(*new)
        return True


__all__ = ["figure", "save", "colors", "Plot", "DPI", "SINGLE", "PANEL", "STYLE"]
