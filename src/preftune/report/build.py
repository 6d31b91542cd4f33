"""Writing a report: read the run, draw the figures, save them and the HTML page."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.report import sections
from preftune.report.diagnostics import (
    logps_trend,
    loss_curve,
    margin_label,
    reward_label,
)
from preftune.report.figures import logps_figure, training_curves
from preftune.report.html import page
from preftune.report.landscape import landscape_figure, margin_histogram
from preftune.report.plotting import png_bytes
from preftune.report.run_files import read_run

FIGURE_FOLDER = "report"
HTML_NAME = "report.html"


@dataclass
class Report:
    """Where the report was written and what its figures plotted.

    ``facts`` maps each figure's name (also its PNG file's stem) to the numbers it plotted.
    """

    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    collapse: bool = False


def write_report(run_dir: str | Path) -> Report:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/report/<figure>.png``.

    Raises:
        FileNotFoundError: if ``run_dir`` is not a run directory (no ``metrics.jsonl``).
    """
    run = read_run(run_dir)
    trend = logps_trend(run)
    x_label = margin_label(run.config)
    results = {
        "training": training_curves(run, reward_label(run.config)),
        "logps": logps_figure(run, trend),
        "landscape": landscape_figure(run, loss_curve(run.config), x_label),
        "margins": margin_histogram(run, x_label),
    }

    # Figures: PNG files beside the page, the same bytes inline in it.
    folder = run.path / FIGURE_FOLDER
    folder.mkdir(exist_ok=True)
    report = Report(run.path / HTML_NAME, collapse=bool(trend and trend.collapse))
    pngs: dict[str, bytes | None] = {}
    for name, result in results.items():
        report.facts[name] = result.facts
        target = folder / f"{name}.png"
        if result.figure is None:
            pngs[name] = None
            target.unlink(missing_ok=True)  # no stale figure from an earlier report
            continue
        pngs[name] = png_bytes(result.figure)
        target.write_bytes(pngs[name])
        report.figures[name] = target

    # Page: sections in reading order.
    body = [
        sections.overview(run, trend),
        sections.figure_section(
            "training",
            "Loss, rewards and accuracy",
            "The loss should fall, the chosen reward should pull away from the rejected one "
            "and the accuracy should rise above the coin flip of 0.5.",
            results["training"],
            pngs["training"],
        ),
        sections.figure_section(
            "logps",
            "Chosen and rejected log-probs",
            "How likely the policy finds each response. DPO only rewards the gap between "
            "them, so both can fall while the gap grows.",
            results["logps"],
            pngs["logps"],
            before=sections.collapse_box(trend, run.config),
        ),
        sections.figure_section(
            "landscape",
            "Loss landscape",
            "Each held-out pair sits on the loss curve at its reward margin x: hollow circles "
            "at the first evaluation, filled dots at the last. Below the curve, one line per "
            "pair shows where it moved.",
            results["landscape"],
            pngs["landscape"],
        ),
        sections.figure_section(
            "margins",
            "Reward margins",
            "The distribution of held-out reward margins at the first and last evaluation.",
            results["margins"],
            pngs["margins"],
        ),
        sections.samples(run),
        sections.run_tables(run),
    ]
    text = page(f"preftune report: {run.path.name}", sections.header(run), body)
    partial = report.html.with_name(report.html.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, report.html)  # a reader never sees half a page
    return report
