"""What every figure of the report shares: the result type, the canvas, colours and smoothing.

Figures are built with matplotlib's object API (``Figure`` and its Agg canvas) and pyplot is
never imported, so writing a report neither needs a display nor changes the plotting backend
of the process that called it (a notebook, for instance).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# 12 x 4.2 inches at 100 dpi: 1200 px wide, so a figure fits a 1280 px window unscaled.
WIDTH_IN = 12.0
HEIGHT_IN = 4.2
DPI = 100

CHOSEN = "#1b9e77"
REJECTED = "#d95f02"
MARGIN = "#7570b3"
TRAIN = "#4477aa"
EVAL = "#cc3311"
START = "#4477aa"
END = "#ee7733"
STEEP_FILL = "#f4c7c3"
FLAT_FILL = "#cfe8cf"


@dataclass
class FigureResult:
    """One figure, the numbers it plotted (for captions and tests) and a caption.

    ``figure`` is None when the run has no data for it; ``message`` then says why.
    """

    name: str
    title: str
    figure: Figure | None
    facts: dict[str, Any] = field(default_factory=dict)
    caption: str = ""
    message: str = ""


def new_figure(
    ncols: int = 1,
    height: float = HEIGHT_IN,
    width_ratios=None,
    nrows: int = 1,
    height_ratios=None,
    sharex: bool = False,
):
    """A figure of the report's width with ``nrows`` x ``ncols`` axes, as a flat list."""
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        nrows,
        ncols,
        width_ratios=width_ratios,
        height_ratios=height_ratios,
        sharex=sharex,
        squeeze=False,
    ).ravel()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` values, skipping NaN; NaN where a window has none."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, v, 0.0), kernel)[: len(v)]
    counts = np.convolve(finite.astype(np.float64), kernel)[: len(v)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def smoothing_window(num_points: int) -> int:
    """1 (no smoothing) up to 20 points; then about a twentieth of the run."""
    return 1 if num_points <= 20 else max(2, num_points // 20)


def no_data(ax: Axes, text: str) -> None:
    ax.text(
        0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", wrap=True
    )


def fmt(value: float, digits: int = 3) -> str:
    """A number for a caption; NaN and infinities spelled out. Values that would round to 0
    at ``digits`` decimals keep ``digits`` significant figures down to 1e-5 (a loss of
    0.000324 is not shown as 0.000); smaller ones are float noise here (a step-0 margin of
    3e-7) and show as 0."""
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    if 1e-5 <= abs(value) < 0.5 * 10**-digits:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"
