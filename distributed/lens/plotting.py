"""What the lens's figures share: matplotlib set up for files (Agg, no display), and a curve put on a
grid of fractions of its trajectory, so that curves of different lengths can be averaged."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence


@contextmanager
def saved_figure(path: Any, dpi: int, format: str | None = None, **subplots: Any):
    """(figure, axes) of `plt.subplots(**subplots)`; when the block ends the figure is laid out and saved
    to `path` (a file name, or a binary buffer); it is closed either way."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(**subplots)
    try:
        yield figure, axes
        figure.tight_layout()
        figure.savefig(path, dpi=dpi, format=format)
    finally:
        plt.close(figure)


def on_fraction_grid(curve: Sequence[float], positions: Sequence[int], grid: Sequence[float]) -> list[float] | None:
    """A probe curve resampled at fractions of its trajectory (position / last position), linearly
    between probed positions; None when it cannot be (lengths differ, nothing probed past position 0)."""
    import numpy as np

    if not curve or len(curve) != len(positions) or max(positions) <= 0:
        return None
    fractions = np.asarray(positions, dtype=float) / max(positions)
    order = np.argsort(fractions)
    return np.interp(grid, fractions[order], np.asarray(curve, dtype=float)[order]).tolist()
