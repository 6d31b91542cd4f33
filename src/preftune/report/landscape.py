"""Where the held-out pairs sit on the loss curve, at the first and the last evaluation.

The DPO loss of a pair is -log sigmoid(x) with x = beta * h, its reward margin (Rafailov et
al. 2023, eq. 7). Below x = 0 the model prefers the rejected response, the curve is steep and
the pair gets most of the gradient; above 0 it agrees with the label and the curve flattens,
so the pair contributes less and less. With a reference-based loss every pair starts at
x = 0, since the policy starts as the reference.
These figures show how the pairs moved between the two evaluations and how many ended up on
each side.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes

from preftune.report import plotting as p
from preftune.report.diagnostics import LossCurve, eval_margins, region_counts
from preftune.report.run_files import RunFiles

NO_PAIRS = (
    "This run wrote no per-pair evaluation rows (eval_pairs.jsonl), so there is "
    "nothing to place on the curve. Runs with held-out pairs write them at every "
    "evaluation."
)


def landscape_figure(run: RunFiles, curve: LossCurve, x_label: str) -> p.FigureResult:
    """The loss curve, shaded steep and flat, with each held-out pair at its first and last
    evaluation.

    ``facts`` holds the steps, the pairs plotted at each (``plotted``), those with a margin
    that is not a number (``not_finite``) and the count per region (``counts``).
    """
    steps = run.eval_steps
    if not steps:
        return p.FigureResult(
            "landscape",
            "Loss landscape",
            None,
            {"plotted": {"start": 0, "end": 0}},
            message=NO_PAIRS,
        )
    first, last = steps[0], steps[-1]
    start, end = eval_margins(run, first), eval_margins(run, last)
    facts = {
        "first_step": first,
        "last_step": last,
        "plotted": {"start": _finite(start), "end": _finite(end)},
        "not_finite": {"start": len(start) - _finite(start), "end": len(end) - _finite(end)},
        "counts": {"start": region_counts(start), "end": region_counts(end)},
    }

    single = first == last
    if single:
        fig, (ax,) = p.new_figure(1, height=4.6)
    else:
        fig, (ax, moves_ax) = p.new_figure(
            1, height=6.4, nrows=2, height_ratios=(3, 1.25), sharex=True
        )
    xs = [x for x in start + end if math.isfinite(x)] or [0.0]
    low, high = min(-2.0, 1.1 * min(xs)), max(2.0, 1.1 * max(xs))
    ax.axvspan(low, 0, color=p.STEEP_FILL, alpha=0.6, linewidth=0)
    ax.axvspan(0, high, color=p.FLAT_FILL, alpha=0.6, linewidth=0)
    grid = np.linspace(low, high, 400)
    ax.plot(grid, curve.fn(grid), color="0.1", linewidth=1.8, label=curve.label)
    ax.set_xlim(low, high)
    ax.set_ylim(bottom=0)

    ax.scatter(
        *_on_curve(start, curve),
        s=46,
        facecolors="none",
        edgecolors=p.START,
        linewidths=1.6,
        zorder=3,
        label=f"step {first}"
        + (" (the only evaluation)" if single else " (first eval)")
        + f": {_pairs(facts['plotted']['start'])}",
    )
    if not single:
        ax.scatter(
            *_on_curve(end, curve),
            s=30,
            color=p.END,
            zorder=4,
            label=f"step {last} (last eval): {_pairs(facts['plotted']['end'])}",
        )
    _region_boxes(ax, facts["counts"], first, last, single)
    _label_pile(ax, start, curve)
    ax.set(
        ylabel=f"loss of the pair ({curve.unit})",
        title="Held-out pairs on the loss curve"
        + ("" if single else f": step {first} → step {last}"),
    )
    ax.legend(loc="upper right", fontsize=9)
    if single:
        ax.set_xlabel(x_label)
    else:
        ax.tick_params(labelbottom=True)
        _moves(moves_ax, start, end, first, last)
        moves_ax.set_xlabel(x_label)

    caption = curve.note + (
        " Red: the model prefers the rejected response (x < 0) and the curve is steep, so "
        "these pairs drive the gradient. Green: it prefers the chosen one (x > 0) and the "
        "curve flattens, so these pairs matter less and less. Shading follows the sign of "
        "the margin, as `preftune loss` reports it."
    )
    if any(facts["not_finite"].values()):
        caption += (
            f" Not plotted, margin not a number: {facts['not_finite']['start']} at "
            f"step {first}, {facts['not_finite']['end']} at step {last}."
        )
    return p.FigureResult("landscape", "Loss landscape", fig, facts, caption)


def margin_histogram(run: RunFiles, x_label: str) -> p.FigureResult:
    """Histogram of the held-out reward margins at the first and the last evaluation."""
    steps = run.eval_steps
    if not steps:
        return p.FigureResult(
            "margins", "Reward margins", None, {"plotted": {"start": 0, "end": 0}}, message=NO_PAIRS
        )
    first, last = steps[0], steps[-1]
    start = [x for x in eval_margins(run, first) if math.isfinite(x)]
    end = [x for x in eval_margins(run, last) if math.isfinite(x)]
    facts = {
        "first_step": first,
        "last_step": last,
        "plotted": {"start": len(start), "end": len(end)},
    }
    fig, (ax,) = p.new_figure(1, height=3.6)
    values = start + end
    if not values:
        p.no_data(ax, "every margin is NaN")
        return p.FigureResult("margins", "Reward margins", fig, facts)
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, int(np.clip(2 * math.sqrt(len(values)), 10, 40)) + 1)
    sets = (
        [(first, start, p.START)]
        if first == last
        else [(first, start, p.START), (last, end, p.END)]
    )
    for (step, margins, colour), style in zip(
        sets, ({"histtype": "stepfilled", "alpha": 0.45}, {"histtype": "step", "linewidth": 2.2})
    ):
        if margins:
            ax.hist(
                margins,
                bins=bins,
                color=colour,
                **style,
                label=f"step {step}: {_pairs(len(margins))}, median {np.median(margins):+.3f}",
            )
    ax.axvline(0, color="0.2", linewidth=1.0, linestyle=":")
    ax.set(
        xlabel=x_label,
        ylabel="held-out pairs (count)",
        title="Reward margins of the held-out pairs"
        + ("" if first == last else f": step {first} and step {last}"),
    )
    ax.legend(fontsize=9)
    caption = (
        "Right of the dotted line the policy prefers the chosen response. At the "
        "first evaluation the policy is the reference, so every margin of a "
        "reference-based loss is 0."
    )
    return p.FigureResult("margins", "Reward margins", fig, facts, caption)


def _pairs(count: int) -> str:
    return f"{count} pair" if count == 1 else f"{count} pairs"


def _finite(values: list[float]) -> int:
    return sum(math.isfinite(v) for v in values)


def _on_curve(margins: list[float], curve: LossCurve) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([m for m in margins if math.isfinite(m)], dtype=np.float64)
    return x, (curve.fn(x) if len(x) else x)


def _label_pile(ax: Axes, margins: list[float], curve: LossCurve) -> None:
    """Name the count where every pair sits at one margin (policy = reference at step 0)."""
    finite = [m for m in margins if math.isfinite(m)]
    if len(finite) < 2 or len(set(finite)) > 1:
        return
    x = finite[0]
    y = float(curve.fn(np.array([x]))[0])
    ax.annotate(
        f"all {len(finite)} pairs here",
        (x, y),
        xytext=(-40, -42),
        textcoords="offset points",
        ha="right",
        fontsize=9,
        color=p.START,
        arrowprops={"arrowstyle": "->", "color": p.START, "linewidth": 1.0},
    )


def _moves(ax: Axes, start: list[float], end: list[float], first: int, last: int) -> None:
    """One row per pair, sorted by its first margin: a line from its first to its last."""
    moves = sorted((a, b) for a, b in zip(start, end) if math.isfinite(a) and math.isfinite(b))
    ax.axvspan(-1e9, 0, color=p.STEEP_FILL, alpha=0.6, linewidth=0)
    ax.axvspan(0, 1e9, color=p.FLAT_FILL, alpha=0.6, linewidth=0)
    ax.set_yticks([])
    if not moves:
        p.no_data(ax, "no pair has a finite margin at both evaluations")
        return
    a, b = np.array(moves).T
    rows = np.arange(len(moves))
    right = b >= a
    ax.hlines(
        rows[right],
        a[right],
        b[right],
        color="#2e7d32",
        linewidth=1.2,
        label="moved right (towards agreeing)",
    )
    ax.hlines(
        rows[~right],
        a[~right],
        b[~right],
        color="#b00020",
        linewidth=1.2,
        label="moved left (towards disagreeing)",
    )
    size = 14 if len(moves) <= 60 else 5
    ax.scatter(a, rows, s=size, facecolors="none", edgecolors=p.START, zorder=3)
    ax.scatter(b, rows, s=size, color=p.END, zorder=4)
    ax.set_ylim(-1, len(moves))
    ax.set_ylabel(f"{_pairs(len(moves))},\nby step-{first} x")
    ax.set_title(
        f"Each pair's move from step {first} (hollow) to step {last} (filled)", fontsize=10
    )
    ax.legend(loc="lower right", fontsize=8)


def _region_boxes(ax: Axes, counts: dict, first: int, last: int, single: bool) -> None:
    """Region names over the shading, and one small table of pair counts per region."""
    ax.text(
        -0.01,
        0.97,
        "steep: model disagrees ",
        transform=ax.get_xaxis_transform(),
        ha="right",
        va="top",
        fontsize=10,
        color="#8a1c12",
        fontweight="bold",
    )
    ax.text(
        0.01,
        0.97,
        " flat: model agrees",
        transform=ax.get_xaxis_transform(),
        ha="left",
        va="top",
        fontsize=10,
        color="#1e5c20",
        fontweight="bold",
    )
    steps = [first] if single else [first, last]
    whens = ["start"] if single else ["start", "end"]
    head = "pairs per region " + "".join(f"{f'step {s}':>9}" for s in steps)
    lines = [head]
    for region, label in (
        ("steep", "x < 0 steep"),
        ("bend", "x ≈ 0 bend "),
        ("flat", "x > 0 flat "),
    ):
        lines.append(f"{label:<16} " + "".join(f"{counts[w][region]:>9}" for w in whens))
    ax.text(
        0.012,
        0.04,
        "\n".join(lines),
        transform=ax.transAxes,
        va="bottom",
        ha="left",
        fontsize=9,
        family="monospace",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "edgecolor": "0.6"},
    )
