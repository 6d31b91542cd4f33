"""The report's sections as HTML: what each figure means, the warnings, and the run's tables."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from preftune.report.diagnostics import (
    LogpsTrend,
    loss_name,
    median_of,
    needs_reference,
)
from preftune.report.html import Section, box, esc, image, paragraph, table
from preftune.report.plotting import FigureResult, fmt
from preftune.report.run_files import RunFiles, number, series


def header(run: RunFiles) -> str:
    config = run.config
    model = config.get("model", "unknown model")
    described = f"model {model}, loss {loss_name(config)}, beta {config.get('beta', '?')}"
    return f"<h1>preftune run report</h1><p>{esc(run.path)}</p><p>{esc(described)}</p>"


def overview(run: RunFiles, trend: LogpsTrend | None) -> Section:
    """Size, time and throughput of the run, the held-out metrics at both ends, and a pointer
    to the log-prob warning, which a reader should not have to scroll to find."""
    summary = run.summary
    train_steps, _ = series(run.train_rows, "loss")
    steps = summary.get("steps", train_steps[-1] if train_steps else "?")
    rows: list[tuple[str, str]] = [
        ("optimizer steps", str(steps)),
        ("training pairs", str(summary.get("train_pairs", "?"))),
        ("held-out pairs", str(summary.get("eval_pairs", "?"))),
        ("wall time", _duration(number(summary.get("wall_seconds")))),
        ("median tokens / s (training)", fmt(median_of(run, "tokens_per_second"), 0)),
        ("median pairs / s (training)", fmt(median_of(run, "pairs_per_second"), 2)),
        ("median seconds / step", fmt(median_of(run, "step_seconds"), 3)),
    ]
    for name, label in (
        ("loss", "held-out loss (nats)"),
        ("rewards/accuracies", "held-out reward accuracy"),
        ("rewards/margins", "held-out reward margin"),
    ):
        steps_, values = series(run.eval_rows, name)
        if steps_:
            rows.append(
                (
                    f"{label}, step {steps_[0]} → {steps_[-1]}",
                    f"{fmt(values[0])} → {fmt(values[-1])}",
                )
            )
    body = paragraph(
        "Throughput is the median over training steps (evaluation, generation and loading "
        "are not included); wall time is the whole run, from start to saved model."
    ) + table(rows, numeric=(1,))
    if trend is not None and trend.collapse:
        body += (
            '<div class="box warning" role="note"><h3>Warning: both log-probs fell while the '
            'margin grew</h3><p>See <a href="#logps">chosen and rejected log-probs</a>.</p></div>'
        )
    if not run.eval_rows:
        body += box(
            "notice",
            "No held-out evaluation",
            [
                (
                    "metrics.jsonl has no eval/ rows, so the figures show training batches "
                    "only and the loss landscape and margin histogram are empty."
                )
            ],
        )
    if run.problems:
        body += box("notice", "Lines that could not be read (skipped)", run.problems[:20])
    return Section("overview", "Overview", body)


def figure_section(
    id_: str, title: str, explain: str, result: FigureResult, png: bytes | None, before: str = ""
) -> Section:
    """A figure with the sentence that says how to read it; a notice when there is no data."""
    body = paragraph(explain) + before
    if png is None:
        body += box("notice", "Nothing to draw", [result.message or "No data for this figure."])
    else:
        body += image(png, result.title)
        if result.caption:
            body += paragraph(result.caption, "caption")
    return Section(id_, title, body)


def collapse_box(trend: LogpsTrend | None, config: dict[str, Any]) -> str:
    """The plain-language verdict on the log-probs: warning, all clear, or not enough data."""
    if trend is None:
        return box(
            "notice",
            "Not enough steps to compare log-probs",
            ["The run needs two evaluations, or two training steps, with finite log-probs."],
        )
    where = f"On the {trend.source}, from step {trend.start_step} to step {trend.end_step}"
    moves = (
        f"chosen responses {_move(trend, 'chosen')}; rejected responses "
        f"{_move(trend, 'rejected')}; reward margin {trend.margin[0]:+.3f} → "
        f"{trend.margin[1]:+.3f}."
    )
    if not trend.collapse:
        return box(
            "ok",
            "No log-prob collapse",
            [
                f"{where}: {moves}",
                (
                    f"A collapse would be both log-probs falling by more than {trend.fall_rule} "
                    "while the margin grows."
                ),
            ],
        )
    paragraphs = [
        f"{where}: {moves}",
        (
            "The loss only asks the chosen response to beat the rejected one. The policy got "
            "there by making the rejected response less likely faster than the chosen one, but "
            "the chosen response became less likely too. The probability both lost went to other "
            "text, which may be text that neither response resembles: check the generations "
            "below."
        ),
    ]
    nll = (
        "--rpo-alpha above 0, which adds the negative log-likelihood of the chosen response "
        "so that it is pushed up, not only past the rejected one"
    )
    if needs_reference(config):
        paragraphs.append(
            f"Ways to counter it: a larger --beta, which keeps the policy closer to the "
            f"reference, or {nll}."
        )
    else:
        paragraphs.append(
            f"This run's loss ({loss_name(config)}) has no reference model, so nothing holds "
            "the policy near where it started: expect the fall to continue with more steps. "
            f"Ways to counter it: a reference-based loss (--loss sigmoid), or {nll}."
        )
    return box("warning", "Warning: both log-probs fell while the margin grew", paragraphs)


def samples(run: RunFiles) -> Section:
    """Before and after generations for the same prompts, with their implicit rewards."""
    title = "Generations before and after training"
    if run.samples is None:
        return Section(
            "samples",
            title,
            box(
                "notice",
                "No samples",
                [
                    (
                        "This run wrote no samples.jsonl; --num-samples sets how many "
                        "held-out prompts are generated before and after training."
                    )
                ],
            ),
        )
    if not run.samples:
        return Section(
            "samples",
            title,
            box(
                "notice",
                "No samples",
                ["samples.jsonl is empty: the run was started with --num-samples 0."],
            ),
        )
    has_rewards = any("policy_reward" in s or "reference_reward" in s for s in run.samples)
    if has_rewards:
        note = (
            "Greedy generations from the same held-out prompts. Under each text, its "
            "implicit reward: beta * (log pi(text) - log pi_ref(text)), the trained "
            "policy against the reference. Higher means training made that text more "
            "likely relative to the starting model."
        )
    elif not needs_reference(run.config):
        note = (
            f"Greedy generations from the same held-out prompts. This run's loss "
            f"({loss_name(run.config)}) has no reference model, so the generations have "
            "no implicit reward to show."
        )
    else:
        note = (
            "Greedy generations from the same held-out prompts. This run did not record "
            "their implicit rewards."
        )
    rows = []
    for i, sample in enumerate(run.samples, start=1):
        rows.append(
            f'<tr><td class="num">{i}</td>'
            f'<td class="text">{esc(sample.get("prompt", ""))}</td>'
            + _text_cell(sample.get("reference", ""), sample.get("reference_reward"), has_rewards)
            + _text_cell(sample.get("policy", ""), sample.get("policy_reward"), has_rewards)
            + "</tr>"
        )
    head = (
        "<tr><th>#</th><th>prompt</th><th>before training (reference)</th>"
        "<th>after training (policy)</th></tr>"
    )
    body = paragraph(note) + f'<table class="samples">{head}{"".join(rows)}</table>'
    return Section("samples", title, body)


def run_tables(run: RunFiles) -> Section:
    """The data report, then the resolved config (values that differ from the defaults in
    bold) in three tables side by side, so that some fifty keys fit on one screen."""
    from preftune.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    items = list(run.config.items())
    per_column = max(1, math.ceil(len(items) / 3))
    columns = []
    for i in range(0, len(items), per_column):
        cells = []
        for key, value in items[i : i + per_column]:
            changed = key in defaults and value != defaults[key] and key != "output"
            css = ' class="changed"' if changed else ""
            cells.append(
                f"<tr><td{css}>{esc(key)}</td><td{css}>{esc(_yaml_value(value))}</td></tr>"
            )
        columns.append(f'<table class="config">{"".join(cells)}</table>')
    body = _data_report(run.data_report) + "<h3>config.yaml</h3>"
    if columns:
        body += paragraph("Values in bold differ from the defaults of `preftune train`.")
        body += f'<div class="columns config-columns">{"".join(columns)}</div>'
    else:
        body += paragraph("config.yaml was not found in the run directory.")
    return Section("run", "Data and config", body)


def _yaml_value(value: Any) -> str:
    """Scalars spelled as in the YAML file: true, false, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _data_report(report: dict[str, Any] | None) -> str:
    """Totals in one row, then the counts by reason and by source side by side."""
    if report is None:
        return "<h3>data_report.json</h3>" + paragraph("data_report.json was not found.")
    totals = [
        ("num_read", "records read"),
        ("num_kept", "kept"),
        ("num_dropped", "dropped"),
        ("num_altered", "altered"),
    ]
    html = "<h3>data_report.json</h3>" + table(
        [[report.get(key, "?") for key, _ in totals]],
        [label for _, label in totals],
        numeric=(0, 1, 2, 3),
    )
    parts = []
    for key, label in (
        ("dropped_by_reason", "dropped, by reason"),
        ("altered_by_reason", "altered, by reason"),
        ("read_by_source", "records read, by source"),
    ):
        counts = report.get(key) or {}
        if counts:
            parts.append(table(list(counts.items()), (label, "records"), numeric=(1,)))
    if parts:
        html += f'<div class="columns" style="margin-top: 8px">{"".join(parts)}</div>'
    entries = report.get("entries") or []
    if entries:
        html += paragraph(
            f"{len(entries)} dropped or altered records are listed one by one in data_report.json.",
            "caption",
        )
    return html


def _text_cell(text: Any, reward: Any, has_rewards: bool) -> str:
    cell = f'<td class="text">{esc(text)}'
    if has_rewards:
        value = number(reward)
        shown = f"{value:+.3f}" if math.isfinite(value) else "not recorded"
        cell += f'<div class="reward">implicit reward: {esc(shown)}</div>'
    return cell + "</td>"


def _move(trend: LogpsTrend, which: str) -> str:
    """How one side's log-prob moved, in nats, likelihood and (when known) per token."""
    start, end = getattr(trend, which)
    change = end - start
    per_token = getattr(trend, f"{which}_change_per_token")
    tokens = "" if per_token is None else f", {per_token:+.3f} nats per token"
    if not trend.moved(which):
        return f"held steady ({start:.2f} → {end:.2f} nats{tokens})"
    verb = "fell" if change < 0 else "rose"
    factor = _factor(abs(change))
    likely = "less" if change < 0 else "more"
    about = "" if factor.startswith("more") else "about "
    return (
        f"{verb} by {abs(change):.2f} nats ({start:.2f} → {end:.2f}{tokens}), {about}{factor} "
        f"times {likely} likely"
    )


def _factor(nats: float) -> str:
    """e^nats in words a reader can picture: 2.19, 160,000, more than a million."""
    factor = math.exp(min(nats, 700.0))
    if factor < 100:
        return f"{factor:.3g}"
    if factor < 1e6:
        return f"{float(f'{factor:.2g}'):,.0f}"
    return "more than a million"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "not recorded"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
