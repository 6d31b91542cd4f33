"""Figures over training steps: loss, rewards, reward accuracy and the sequence log-probs.

Training values are per-batch averages and move with the batch drawn; evaluation values come
from the same held-out pairs every time, so they are the ones to compare across steps. Every
panel draws both: training as a line (a trailing moving average on long runs, the raw values
faint behind it), evaluation as dots joined by a dashed line.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from preftune.report import plotting as p
from preftune.report.diagnostics import LogpsTrend
from preftune.report.run_files import RunFiles, series

STEP_LABEL = "step (optimizer steps)"


def training_curves(run: RunFiles, reward_label: str) -> p.FigureResult:
    """Loss, rewards (chosen, rejected, margins) and reward accuracy over steps."""
    fig, (loss_ax, reward_ax, accuracy_ax) = p.new_figure(3)
    drawn = {}

    drawn["loss"] = _draw(loss_ax, run, "loss", p.TRAIN, "loss", eval_colour=p.EVAL)
    loss_ax.set(title="Loss", ylabel="loss (nats)")
    _style_legend(loss_ax, [("train", p.TRAIN, "-"), ("eval", p.EVAL, "--o")], drawn["loss"])

    for name, colour in (
        ("rewards/chosen", p.CHOSEN),
        ("rewards/rejected", p.REJECTED),
        ("rewards/margins", p.MARGIN),
    ):
        drawn[name] = _draw(reward_ax, run, name, colour, name)
    reward_ax.axhline(0, color="0.3", linewidth=0.8)
    reward_ax.set(title="Implicit rewards", ylabel=reward_label)
    _style_legend(
        reward_ax,
        [
            ("chosen", p.CHOSEN, "-"),
            ("rejected", p.REJECTED, "-"),
            ("margin", p.MARGIN, "-"),
            ("train", "0.3", "-"),
            ("eval", "0.3", "--o"),
        ],
        *(drawn[n] for n in ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    )

    drawn["rewards/accuracies"] = _draw(
        accuracy_ax, run, "rewards/accuracies", p.TRAIN, "rewards/accuracies", eval_colour=p.EVAL
    )
    accuracy_ax.axhline(0.5, color="0.3", linewidth=0.8, linestyle=":")
    accuracy_ax.text(
        0.99,
        0.5,
        "coin flip ",
        transform=accuracy_ax.get_yaxis_transform(),
        ha="right",
        va="bottom",
        fontsize=8,
        color="0.3",
    )
    accuracy_ax.set_ylim(-0.03, 1.03)
    accuracy_ax.set(title="Reward accuracy (chosen > rejected)", ylabel="accuracy (share of pairs)")
    _steps_axis(loss_ax, reward_ax, accuracy_ax)
    _style_legend(
        accuracy_ax, [("train", p.TRAIN, "-"), ("eval", p.EVAL, "--o")], drawn["rewards/accuracies"]
    )

    if not any(n for counts in drawn.values() for n in counts):
        return p.FigureResult(
            "training",
            "Loss, rewards and accuracy",
            None,
            drawn,
            message="metrics.jsonl has no finite loss, reward or accuracy value yet.",
        )
    window = p.smoothing_window(len(run.train_rows))
    caption = (
        "Training lines are per-batch averages"
        + (
            f", smoothed with a trailing mean of {window} steps (raw values faint)"
            if window > 1
            else ""
        )
        + "; evaluation dots are the held-out pairs, the same pairs at every evaluation. "
        "A reward is beta times how much more (or less) likely the policy makes a response "
        "than the reference; the margin is chosen minus rejected."
    )
    return p.FigureResult("training", "Loss, rewards and accuracy", fig, drawn, caption)


def logps_figure(run: RunFiles, trend: LogpsTrend | None) -> p.FigureResult:
    """Chosen and rejected sequence log-probs over steps, and how far each moved."""
    fig, (curve_ax, change_ax) = p.new_figure(2, width_ratios=(3, 2))
    drawn = {
        "logps/chosen": _draw(curve_ax, run, "logps/chosen", p.CHOSEN, "chosen"),
        "logps/rejected": _draw(curve_ax, run, "logps/rejected", p.REJECTED, "rejected"),
    }
    curve_ax.set(
        title="Sequence log-probs under the policy", ylabel="log-prob of the whole response (nats)"
    )
    _steps_axis(curve_ax)
    _style_legend(
        curve_ax,
        [
            ("chosen", p.CHOSEN, "-"),
            ("rejected", p.REJECTED, "-"),
            ("train", "0.3", "-"),
            ("eval", "0.3", "--o"),
        ],
        *drawn.values(),
    )
    facts: dict[str, Any] = {"drawn": drawn, "collapse": bool(trend and trend.collapse)}
    if trend is None:
        p.no_data(change_ax, "fewer than two steps with finite log-probs:\nno change to show")
        if not any(n for counts in drawn.values() for n in counts):
            return p.FigureResult(
                "logps",
                "Sequence log-probs",
                None,
                facts,
                message="metrics.jsonl has no log-prob values.",
            )
        return p.FigureResult("logps", "Sequence log-probs", fig, facts)

    _draw_changes(change_ax, trend)
    if trend.collapse:
        fig.suptitle(
            "Warning: both log-probs fell while the reward margin grew",
            color="#b00020",
            fontweight="bold",
        )
    caption = (
        f"Right: change from step {trend.start_step} to step {trend.end_step}, measured on "
        f"the {trend.source}. A fall of d nats makes the response e^d times less likely; "
        f"a change smaller than {trend.fall_rule} is not counted as a fall."
    )
    return p.FigureResult("logps", "Sequence log-probs", fig, facts, caption)


def _draw_changes(ax: Axes, trend: LogpsTrend) -> None:
    changes = [("chosen", trend.chosen, p.CHOSEN), ("rejected", trend.rejected, p.REJECTED)]
    bars = ax.bar(
        [name for name, _, _ in changes],
        [end - start for _, (start, end), _ in changes],
        color=[c for _, _, c in changes],
        width=0.5,
    )
    for bar, (_, (start, end), _) in zip(bars, changes):
        change = end - start
        ax.annotate(
            f"{change:+.2f} nats\n({start:.2f} → {end:.2f})",
            (bar.get_x() + bar.get_width() / 2, change),
            ha="center",
            va="top" if change < 0 else "bottom",
            fontsize=9,
            xytext=(0, -4 if change < 0 else 4),
            textcoords="offset points",
        )
    ax.axhline(0, color="0.3", linewidth=0.8)
    low, high = ax.get_ylim()
    pad = 0.3 * max(high - low, 1e-6)  # room for the labels on either side of 0
    ax.set_ylim(min(low, 0) - pad, max(high, 0) + pad)
    margin_start, margin_end = trend.margin
    ax.set(
        title=f"Change, step {trend.start_step} → {trend.end_step} ({trend.source})",
        ylabel="change in log-prob (nats)",
        xlabel=f"reward margin over the same steps: {margin_start:+.3f} → {margin_end:+.3f}",
    )


def _draw(
    ax: Axes, run: RunFiles, name: str, colour: str, label: str, eval_colour: str | None = None
) -> tuple[int, int]:
    """Draw one metric's training line and evaluation dots; return the points of each."""
    steps, values = series(run.train_rows, name)
    eval_steps, eval_values = series(run.eval_rows, name)
    eval_finite = sum(math.isfinite(v) for v in eval_values)
    finite = sum(math.isfinite(v) for v in values)
    if finite:
        # Where evaluation dots exist they are the reading; training lines step back.
        strength = 0.55 if eval_finite else 1.0
        window = p.smoothing_window(len(values))
        if window > 1:
            ax.plot(steps, values, color=colour, alpha=0.25 * strength, linewidth=0.8)
            values = p.moving_average(values, window)
        ax.plot(
            steps, values, color=colour, alpha=strength, linewidth=1.5, label=f"{label} (train)"
        )
    if eval_finite:
        ax.plot(
            eval_steps,
            eval_values,
            color=eval_colour or colour,
            linestyle="--",
            marker="o",
            markersize=5,
            linewidth=1.6,
            label=f"{label} (eval)",
        )
    return finite, eval_finite


def _steps_axis(*axes: Axes) -> None:
    for ax in axes:
        ax.set_xlabel(STEP_LABEL)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers


def _style_legend(ax: Axes, entries: list[tuple[str, str, str]], *drawn: tuple[int, int]) -> None:
    """A legend of colour and line-style keys, or "no values" when nothing was drawn."""
    if not any(n for counts in drawn for n in counts):
        p.no_data(ax, "no values")
        return
    handles = []
    for label, colour, style in entries:
        marker = "o" if style.endswith("o") else None
        linestyle = style.rstrip("o") or "-"
        handles.append(
            Line2D(
                [], [], color=colour, linestyle=linestyle, marker=marker, markersize=5, label=label
            )
        )
    ax.legend(handles=handles, fontsize=8, loc="best")
