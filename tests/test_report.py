"""The run report: figures count what they plot, the collapse warning fires when it should,
broken or partial runs still render, and the page loads in a real browser without errors.

Most tests build run directories by hand (metrics.jsonl, eval_pairs.jsonl, ...) so that every
expected number can be worked out on paper; one trains a tiny model for a few steps and opens
its report in headless Chromium.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.report import write_report
from preftune.report.diagnostics import logps_trend, loss_curve, region_counts
from preftune.report.landscape import landscape_figure
from preftune.report.run_files import number, read_run

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
WARNING = "Warning: both log-probs fell while the margin grew"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_dir(
    tmp_path: Path,
    loss: str,
    eval_logps: list[tuple[float, float, float]] | None,
    name: str = "run",
    beta: float = 0.1,
) -> Path:
    """A run of 20 steps; ``eval_logps`` holds (chosen, rejected, margin) at steps 0, 10, 20."""
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": "tiny", "loss": loss, "beta": beta, "lr": 1e-5})
    )
    rows = []
    for step in range(1, 21):
        rows.append(
            {
                "step": step,
                "loss": 0.69 - 0.01 * step,
                "rewards/chosen": 0.01 * step,
                "rewards/rejected": -0.01 * step,
                "rewards/margins": 0.02 * step,
                "rewards/accuracies": 0.5,
                "logps/chosen": -50.0,
                "logps/rejected": -52.0,
                "tokens_per_second": 100.0 * step,
                "pairs_per_second": 2.0,
                "step_seconds": 0.5,
            }
        )
    for step, (chosen, rejected, margin) in zip((0, 10, 20), eval_logps or []):
        rows.append(
            {
                "step": step,
                "eval/loss": 0.6,
                "eval/rewards/margins": margin,
                "eval/logps/chosen": chosen,
                "eval/logps/rejected": rejected,
                "eval/rewards/accuracies": 0.75,
            }
        )
    _jsonl(run / "metrics.jsonl", sorted(rows, key=lambda r: r["step"]))
    (run / "summary.json").write_text(
        json.dumps({"steps": 20, "train_pairs": 80, "eval_pairs": 4, "wall_seconds": 75.0})
    )
    return run


def _eval_pairs(run: Path, margins_by_step: dict[int, list[float | str]]) -> None:
    _jsonl(
        run / "eval_pairs.jsonl",
        [
            {"step": step, "source": "eval.jsonl", "record": i + 1, "margin": m, "h": m}
            for step, margins in margins_by_step.items()
            for i, m in enumerate(margins)
        ],
    )


def test_collapse_warning_for_ref_free_run_where_both_logps_fall(tmp_path):
    """Held-out chosen -50 -> -62 (fell 12 nats), rejected -52 -> -75 (fell 23 nats), margin
    0.2 -> 1.3 (grew): the collapse, on a loss without a reference."""
    run = _run_dir(tmp_path, "ref_free", [(-50, -52, 0.2), (-55, -60, 0.5), (-62, -75, 1.3)])
    report = write_report(run)
    trend = logps_trend(read_run(run))
    assert (trend.source, trend.start_step, trend.end_step) == ("held-out pairs", 0, 20)
    assert trend.chosen_change == -12 and trend.rejected_change == -23
    assert trend.margin_change == pytest.approx(1.1)
    assert report.collapse and report.facts["logps"]["collapse"]
    page = report.html.read_text()
    assert WARNING in page
    assert "fell by 12.00 nats (-50.00 → -62.00)" in page
    assert "has no reference model" in page


def test_no_collapse_warning_for_dpo_run_where_chosen_rises(tmp_path):
    """Chosen -50 -> -49 (rose 1 nat), rejected -52 -> -60: DPO working as intended."""
    run = _run_dir(tmp_path, "sigmoid", [(-50, -52, 0.0), (-49.5, -56, 0.4), (-49, -60, 0.9)])
    report = write_report(run)
    assert not report.collapse and not report.facts["logps"]["collapse"]
    page = report.html.read_text()
    assert WARNING not in page and "No log-prob collapse" in page
    assert "rose by 1.00 nats" in page


def test_collapse_is_read_from_training_steps_without_evaluation(tmp_path):
    """Without eval rows the trend averages the first and last tenth of 20 steps (2 each):
    chosen -50 -> -60, rejected -52 -> -70, margin 0.03 -> 0.39 (steps 1-2 and 19-20)."""
    run = _run_dir(tmp_path, "ref_free", None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows[-2:]:
        row["logps/chosen"], row["logps/rejected"] = -60.0, -70.0
    _jsonl(run / "metrics.jsonl", rows)
    trend = logps_trend(read_run(run))
    assert trend.source == "training batches (mean of 2 steps)"
    assert (trend.chosen, trend.rejected) == ((-50, -60), (-52, -70))
    assert trend.margin == pytest.approx((0.03, 0.39))  # means of 0.02, 0.04 and 0.38, 0.40
    assert trend.collapse


def test_small_moves_are_not_a_collapse(tmp_path):
    """Both fell by 0.05 nats, under the 0.1-nat threshold: noise, not a collapse."""
    run = _run_dir(tmp_path, "sigmoid", [(-50, -52, 0.0), (-50, -52, 0.1), (-50.05, -52.05, 0.2)])
    assert not logps_trend(read_run(run)).collapse


def _with_eval_lengths(run: Path, chosen: float, rejected: float) -> Path:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "eval/loss" in row or "eval/logps/chosen" in row:
            row["eval/lengths/chosen"], row["eval/lengths/rejected"] = chosen, rejected
    _jsonl(run / "metrics.jsonl", rows)
    return run


def test_with_lengths_a_fall_is_judged_per_token(tmp_path):
    """Chosen -57.2 -> -58.2 over 30-token responses: -1/30 = -0.033 nats per token, under
    the 0.05 threshold, while rejected -134.8 -> -240.1 over 80 tokens is -1.32 per token.
    Per response, chosen fell by 1 nat (over the 0.1-nat fallback), yet no collapse."""
    run = _run_dir(tmp_path, "sigmoid", [(-57.2, -134.8, 0.0), (-57.3, -225.6, 9.1),
                                         (-58.2, -240.1, 10.4)])
    trend = logps_trend(read_run(_with_eval_lengths(run, 30.0, 80.0)))
    assert trend.per_token and trend.fall_rule == "0.05 nats per response token"
    assert trend.chosen_change_per_token == pytest.approx(-1 / 30)
    assert trend.rejected_change_per_token == pytest.approx((-240.1 + 134.8) / 80)
    assert not trend.fell("chosen") and trend.fell("rejected") and not trend.collapse
    page = write_report(run).html.read_text()
    assert "No log-prob collapse" in page and "-0.033 nats per token" in page


def test_with_lengths_a_long_fall_of_both_is_a_collapse(tmp_path):
    """Chosen -50 -> -62 over 20 tokens (-0.6 per token), rejected -52 -> -75 over 25
    (-0.92 per token), margin grew: a collapse, judged per token."""
    run = _run_dir(tmp_path, "ref_free", [(-50, -52, 0.2), (-55, -60, 0.5), (-62, -75, 1.3)])
    trend = logps_trend(read_run(_with_eval_lengths(run, 20.0, 25.0)))
    assert trend.per_token and trend.collapse
    assert trend.chosen_change_per_token == pytest.approx(-0.6)
    assert WARNING in write_report(run).html.read_text()


def test_landscape_plots_every_pair_and_counts_regions(tmp_path):
    """Step 0: all five pairs at the bend (x = 0). Step 20: x = -0.5, 0, 0.3, 1.2 and one
    "nan" string, which cannot be placed: 1 steep, 1 bend, 2 flat, 1 not plotted."""
    run = _run_dir(tmp_path, "sigmoid", [(-50, -52, 0.0), (-50, -53, 0.2), (-49, -55, 0.3)])
    _eval_pairs(run, {0: [0.0] * 5, 10: [0.1] * 5, 20: [-0.5, 0.0, 0.3, 1.2, "nan"]})
    files = read_run(run)
    result = landscape_figure(files, loss_curve(files.config), "x")
    assert (result.facts["first_step"], result.facts["last_step"]) == (0, 20)
    assert result.facts["plotted"] == {"start": 5, "end": 4}
    assert result.facts["not_finite"] == {"start": 0, "end": 1}
    assert result.facts["counts"] == {
        "start": {"steep": 0, "bend": 5, "flat": 0},
        "end": {"steep": 1, "bend": 1, "flat": 2},
    }
    points = [c for c in result.figure.axes[0].collections if len(c.get_offsets())]
    assert [len(c.get_offsets()) for c in points] == [5, 4]  # hollow start, filled end
    report = write_report(run)
    assert report.facts["margins"]["plotted"] == {"start": 5, "end": 4}
    assert "Not plotted, margin not a number: 0 at step 0, 1 at step 20" in report.html.read_text()


@pytest.mark.parametrize(
    ("loss", "settings", "x", "expected"),
    [
        # -log sigmoid(0) = ln 2; -log sigmoid(2) = log(1 + e^-2) = 0.126928.
        ("sigmoid", {}, [0.0, 2.0], [math.log(2), math.log1p(math.exp(-2))]),
        ("ref_free", {}, [0.0], [math.log(2)]),
        # max(0, 1 - x): 2 at x = -1, 0 at x = 2.
        ("hinge", {}, [-1.0, 2.0], [2.0, 0.0]),
        # -log sigmoid(x - gamma) is ln 2 at x = gamma = 0.5.
        ("simpo", {"simpo_gamma": 0.5, "beta": 2.0}, [0.5], [math.log(2)]),
        # cDPO, epsilon 0.1, at x = 0: -(0.9 + 0.1) log sigmoid(0) = ln 2.
        ("sigmoid", {"label_smoothing": 0.1}, [0.0], [math.log(2)]),
    ],
)
def test_loss_curve_is_the_runs_own_loss_over_the_margin(loss, settings, x, expected):
    curve = loss_curve({"loss": loss, **settings})
    assert curve.exact
    assert curve.fn(np.array(x)) == pytest.approx(expected, abs=1e-9)


def test_losses_not_defined_by_the_margin_fall_back_to_dpo_and_say_so():
    curve = loss_curve({"loss": "ipo", "beta": 0.1})
    assert not curve.exact and "drawn for orientation only" in curve.note
    assert curve.fn(np.array([0.0])) == pytest.approx([math.log(2)])


def test_region_counts_by_sign_of_the_margin():
    """-0.0 is at the bend like 0.0; NaN and inf cannot be placed on the curve."""
    assert region_counts([-1.0, -0.0, 0.0, 2.0, math.nan, math.inf]) == {
        "steep": 1,
        "bend": 2,
        "flat": 1,
    }


def test_margins_within_the_tie_tolerance_are_at_the_bend():
    """Step 0 margins are 0 up to recomputation noise (~1e-6): at the bend, like a tie in
    reward accuracy; 2e-5 is past the 1e-5 tolerance."""
    assert region_counts([-4e-6, 1e-6, 9e-6, -2e-5, 2e-5]) == {"steep": 1, "bend": 3, "flat": 1}


def test_nan_strings_in_metrics_are_read_as_nan_and_still_render(tmp_path):
    """A diverged run writes "nan" and "inf" as strings; the report reads them as floats."""
    run = _run_dir(tmp_path, "sigmoid", [(-50, -52, 0.0), ("nan", -53, 0.1), (-49, -54, 0.4)])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows[5:9]:
        if "loss" in row:
            row.update({"loss": "nan", "rewards/margins": "inf", "tokens_per_second": "nan"})
    _jsonl(run / "metrics.jsonl", rows)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "loss": 0.3')  # a run killed mid-line
    assert math.isnan(number("nan")) and number("-inf") == -math.inf and math.isnan(number(None))
    report = write_report(run)
    assert set(report.figures) == {"training", "logps"}
    # The trend skips the eval row with a NaN log-prob but keeps both ends.
    assert logps_trend(read_run(run)).chosen == (-50, -49)
    page = report.html.read_text()
    assert f"metrics.jsonl:{len(rows) + 1}: not valid JSON, skipped" in page
    assert "median tokens / s (training)" in page


def test_run_without_evaluation_or_samples_renders_with_notices(tmp_path):
    run = _run_dir(tmp_path, "sigmoid", None)
    stale = run / "report" / "landscape.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    report = write_report(run)
    assert set(report.figures) == {"training", "logps"}
    assert not stale.exists()  # an earlier report's figure does not outlive its data
    assert report.facts["landscape"]["plotted"] == {"start": 0, "end": 0}
    page = report.html.read_text()
    assert "No held-out evaluation" in page and "no per-pair evaluation rows" in page
    assert "This run wrote no samples.jsonl" in page


def test_single_evaluation_is_drawn_once(tmp_path):
    run = _run_dir(tmp_path, "sigmoid", [(-50, -52, 0.0)])
    _eval_pairs(run, {20: [0.5, -0.25]})
    report = write_report(run)
    facts = report.facts["landscape"]
    assert (facts["first_step"], facts["last_step"]) == (20, 20)
    assert facts["counts"]["start"] == {"steep": 1, "bend": 0, "flat": 1}
    assert report.facts["margins"]["plotted"] == {"start": 2, "end": 2}


def test_generations_are_escaped_and_show_their_rewards(tmp_path):
    run = _run_dir(tmp_path, "sigmoid", None)
    _jsonl(
        run / "samples.jsonl",
        [
            {
                "prompt": "Q: <b>bold</b> & more?",
                "reference": "ok",
                "policy": "<script>alert(1)</script>",
                "reference_reward": -0.5,
                "policy_reward": 0.25,
            },
            {"prompt": "second", "reference": "a", "policy": "b", "reference_reward": "nan"},
        ],
    )
    page = write_report(run).html.read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Q: &lt;b&gt;bold&lt;/b&gt; &amp; more?" in page
    assert "implicit reward: +0.250" in page and "implicit reward: -0.500" in page
    assert page.count("implicit reward: not recorded") == 2


def test_reference_free_generations_explain_the_missing_rewards(tmp_path):
    run = _run_dir(tmp_path, "ref_free", None)
    _jsonl(run / "samples.jsonl", [{"prompt": "p", "reference": "a", "policy": "b"}])
    page = write_report(run).html.read_text()
    assert "has no reference model, so the generations have no implicit reward" in page


def test_report_command(tmp_path, capsys):
    run = _run_dir(tmp_path, "ref_free", [(-50, -52, 0.2), (-55, -60, 0.5), (-62, -75, 1.3)])
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"report written to {run / 'report.html'}" in out
    assert "warning: both log-probs fell" in out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# The report of a real run, opened in a browser


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (the tests run as root)."""
    if CHROMIUM.exists():
        return CHROMIUM
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    try:
        result = subprocess.run(
            install, check=False, capture_output=True, text=True, env=env, timeout=1200
        )
        if result.returncode != 0:  # a stale package list is the usual cause
            subprocess.run(
                ["apt-get", "update"], check=False, capture_output=True, env=env, timeout=600
            )
            result = subprocess.run(
                install, check=False, capture_output=True, text=True, env=env, timeout=1200
            )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"{CHROMIUM} is missing and `apt-get install -y chromium` could not run: {err}")
    if result.returncode != 0 or not CHROMIUM.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        pytest.skip(
            f"{CHROMIUM} is missing and `apt-get install -y chromium` failed: "
            f"{tail[0] if tail else 'exit ' + str(result.returncode)}"
        )
    return CHROMIUM


def _browse(chromium: Path, page: Path, *flags: str) -> tuple[str, list[str]]:
    """Run headless Chromium on ``page``; return stdout and the page's console messages."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                str(chromium),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--hide-scrollbars",
                *flags,
                page.as_uri(),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    # Every console message (errors, uncaught exceptions, blocked loads) is logged as CONSOLE.
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


# Injected into a copy of the page (the report itself has no script): which images decoded,
# and how tall the page is, written into the DOM for --dump-dom to return.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({
    height: document.documentElement.scrollHeight,
    images: [...document.images].map(i => ({
      data: i.src.startsWith("data:image/png;base64,") && i.src.length > 1000,
      width: i.naturalWidth,
    })),
  });
  document.body.appendChild(out);
});
</script>"""


def test_report_of_a_tiny_run_renders_in_headless_chromium(tmp_path, tiny_llama_folder, chromium):
    rows = [
        {"prompt": "Q: How do I boil an egg?", "chosen": " Nine minutes.", "rejected": " No."},
        {"prompt": "Q: colour?", "chosen": " Red", "rejected": " The lazy dog sleeps."},
        {"prompt": "Q: a number?", "chosen": " Seven", "rejected": " I would rather not say."},
        {"prompt": "Q: <b>a pet</b>?", "chosen": " A cat.", "rejected": " Dog <script>"},
    ]
    _jsonl(tmp_path / "train.jsonl", rows * 3)
    _jsonl(tmp_path / "eval.jsonl", rows)
    from preftune.train import train

    result = train(
        TrainConfig(
            model=str(tiny_llama_folder),
            data=str(tmp_path / "train.jsonl"),
            eval_data=str(tmp_path / "eval.jsonl"),
            output=str(tmp_path / "run"),
            lr=5e-3,
            max_steps=4,
            eval_every=2,
            batch_size=2,
            num_samples=2,
            sample_max_new_tokens=4,
            progress=False,
            report=True,
        )
    )
    page = result.run_dir / "report.html"
    assert page.is_file()
    assert sorted(p.name for p in (result.run_dir / "report").iterdir()) == [
        "landscape.png",
        "logps.png",
        "margins.png",
        "training.png",
    ]

    # Every held-out pair is plotted, at the first and at the last evaluation.
    report = write_report(result.run_dir)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["eval_pairs"] == len(rows)
    assert report.facts["landscape"]["plotted"] == {"start": len(rows), "end": len(rows)}
    assert report.facts["margins"]["plotted"] == {"start": len(rows), "end": len(rows)}
    assert (report.facts["landscape"]["first_step"], report.facts["landscape"]["last_step"]) == (
        0,
        4,
    )

    # Every image is an inline PNG that decodes; nothing is logged to the console.
    checked = tmp_path / "checked.html"
    text = page.read_text()
    checked.write_text(
        text.replace(
            "default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';"
        ).replace("</body>", IMAGE_CHECK + "</body>")
    )
    dom, console = _browse(chromium, checked, "--dump-dom")
    assert console == []
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(check["images"]) == 4
    assert all(i["data"] and i["width"] == 1200 for i in check["images"])

    # The page as a reader sees it at 1280 px, saved for people to look at.
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-tiny-run.png"
    shot.unlink(missing_ok=True)
    height = min(check["height"] + 20, 16000)
    _, console = _browse(chromium, page, f"--screenshot={shot}", f"--window-size=1280,{height}")
    assert console == []
    assert shot.is_file() and shot.stat().st_size > 50_000
    shutil.copy(page, ARTIFACTS / "report-tiny-run.html")


def test_small_values_keep_significant_figures():
    """A final loss of 0.000324 is not shown as 0.000; a step-0 margin of 3.43e-7 (float
    noise) is; ordinary values keep 3 decimals."""
    from preftune.report.plotting import fmt

    assert [fmt(0.00032405), fmt(0.693147), fmt(0.0), fmt(3.43e-7), fmt(12345.6)] == [
        "0.000324", "0.693", "0.000", "0.000", "12,346"]
