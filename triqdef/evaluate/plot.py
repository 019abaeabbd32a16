"""Heatmap figures of the evaluation reports, drawn on matplotlib's Agg canvas (no pyplot)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

_MPL_HINT = "pip install matplotlib (or pip install 'triqdef[vision]')"


def _figure(size: tuple[float, float]):
    """A matplotlib Figure on an Agg canvas, imported lazily."""
    try:  # optional dependency (the vision extra): imported only when a figure is drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"heatmap() needs matplotlib: {_MPL_HINT}") from e
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def transfer_heatmap(
    path: str | os.PathLike,
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
) -> Path:
    """Write an ASR grid in percent (the noise-floor row last, below a line) as a PNG.

    Args:
        path: output file; PNG whatever the suffix.
        values: one row per source bit-width, then the noise-floor row, in percent.
        row_labels: one label per row of ``values``.
        col_labels: one label per target bit-width.
        title: figure title.

    Returns:
        the path written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    fig = _figure((1.2 + 0.9 * len(col_labels), 1.2 + 0.6 * len(values)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, vmin=0, vmax=100, cmap="magma", aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = "n/a" if math.isnan(v) else f"{v:.1f}"
            color = "gray" if math.isnan(v) else ("black" if v > 60 else "white")
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    ax.axhline(len(values) - 1.5, color="white", linewidth=2)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(list(col_labels))
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(list(row_labels))
    ax.set_xlabel("target (evaluated at)")
    ax.set_ylabel("source (crafted at)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def alignment_heatmap(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    cell_text: Sequence[Sequence[Sequence[str]]],
    title: str | None,
) -> Path:
    """Write one heatmap panel per map (rows = metrics, columns = pairs) to a PNG.

    Args:
        path: output file (PNG).
        panels: ``(panel title, grid)`` per map; grids are ``metrics x pairs`` in [0, 1].
        row_labels: the metric labels.
        col_labels: the pair labels, shown under the last panel.
        cell_text: the text of every cell, per panel.
        title: figure title (``None``: none).

    Returns:
        the path written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    n = len(panels)
    width = 2.5 + 0.9 * len(col_labels)
    fig = _figure((width, 0.6 + n * (0.5 + 0.4 * len(row_labels))))
    for r, (name, grid) in enumerate(panels):
        ax = fig.add_subplot(n, 1, r + 1)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                color = "gray" if math.isnan(v) else ("black" if v > 0.6 else "white")
                text = cell_text[r][i][j]
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=7)
        ax.set_xticks(range(len(col_labels)))
        ax.set_xticklabels(list(col_labels) if r == n - 1 else [""] * len(col_labels))
        ax.set_yticks(range(len(row_labels)))
        ax.set_yticklabels(list(row_labels), fontsize=7)
        ax.set_title(name, fontsize=8)
        fig.colorbar(image, ax=ax)
    if title is not None:
        fig.suptitle(title)
    return _save(fig, path)
