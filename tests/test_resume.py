"""A run stopped by a signal, a kill or a second Ctrl-C resumes to the unbroken run's result.

Each test compares with one uninterrupted run: per-step metrics (all keys but timing),
held-out rows and final weights must be identical, bit for bit, on CPU.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time

import pytest
from training_runs import (
    STEPS,
    assert_same_weights,
    losses,
    metric_rows,
    start,
    train_args,
)

from preftune import checkpoint
from preftune.cli import main


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_llama_folder, pairs):
    """The uninterrupted run every other run is compared with."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(train_args(tiny_llama_folder, pairs, out)) == 0
    return out


def _assert_same_run(run, baseline):
    assert metric_rows(run) == metric_rows(baseline)
    assert (run / "eval_pairs.jsonl").read_text() == (baseline / "eval_pairs.jsonl").read_text()
    assert_same_weights(
        run / "model" / "model.safetensors", baseline / "model" / "model.safetensors"
    )


def _train_rows_written(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"loss":') if path.exists() else 0


def test_baseline_logs_every_step_and_keeps_the_last_two_checkpoints(baseline):
    assert [step for step, _ in losses(baseline)] == list(range(1, STEPS + 1))
    assert sorted(os.listdir(baseline / "checkpoints")) == ["step-6", "step-8"]
    assert checkpoint.verify(baseline / "checkpoints" / "step-8") is None


def test_sigint_at_a_random_step_then_resume_equals_the_unbroken_run(
    tmp_path, tiny_llama_folder, pairs, baseline
):
    stop_after = random.randint(1, STEPS - 3)
    out = tmp_path / "run"
    # A pause before each step leaves time for the signal to land inside the loop.
    proc = start(train_args(tiny_llama_folder, pairs, out), PREFTUNE_TEST_STEP_DELAY="0.3")
    deadline = time.monotonic() + 120
    while _train_rows_written(out) < stop_after and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err
    stopped = int(re.search(r"SIGINT: stopped after step (\d+); checkpoint saved at ", err)[1])
    assert stop_after <= stopped < STEPS, (stop_after, stopped)
    assert checkpoint.newest_valid(out) == out / "checkpoints" / f"step-{stopped}"
    assert losses(out) == losses(baseline)[:stopped]

    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_run(out, baseline)


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(
    tmp_path, tiny_llama_folder, pairs, baseline
):
    out = tmp_path / "run"
    proc = start(
        train_args(tiny_llama_folder, pairs, out), PREFTUNE_TEST_SIGNAL_IN_SAVE="4:SIGKILL"
    )
    proc.communicate(timeout=120)

    assert proc.returncode == -signal.SIGKILL
    folders = sorted(os.listdir(out / "checkpoints"))
    assert folders[-1] == "step-2" and folders[0].startswith(".staging-step-4-")
    assert checkpoint.verify(out / "checkpoints" / "step-2") is None
    # Nothing written before the kill is lost: step 4's row was logged before its save.
    assert losses(out) == losses(baseline)[:4]
    assert (out / "data_report.json").read_text() == (baseline / "data_report.json").read_text()

    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_run(out, baseline)
    assert (out / "metrics.replaced.jsonl").read_text().count('"loss":') == 2  # steps 3, 4
    assert not any(name.startswith(".staging") for name in os.listdir(out / "checkpoints"))


def test_second_ctrl_c_during_a_save_keeps_the_previous_checkpoint(
    tmp_path, tiny_llama_folder, pairs, baseline, monkeypatch, capsys
):
    out = tmp_path / "run"
    monkeypatch.setenv("PREFTUNE_TEST_SIGNAL_IN_SAVE", "4:SIGINT,SIGINT")

    assert main(train_args(tiny_llama_folder, pairs, out)) == 130

    assert os.listdir(out / "checkpoints") == ["step-2"]
    assert checkpoint.verify(out / "checkpoints" / "step-2") is None
    monkeypatch.delenv("PREFTUNE_TEST_SIGNAL_IN_SAVE")
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_run(out, baseline)


def test_ctrl_c_during_a_periodic_save_lets_it_finish_then_stops(
    tmp_path, tiny_llama_folder, pairs, baseline, monkeypatch, caplog
):
    out = tmp_path / "run"
    monkeypatch.setenv("PREFTUNE_TEST_SIGNAL_IN_SAVE", "4:SIGINT")

    assert main(train_args(tiny_llama_folder, pairs, out)) == 130

    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]
    assert checkpoint.verify(out / "checkpoints" / "step-4") is None
    assert (
        f"SIGINT: stopped after step 4; checkpoint saved at {out}/checkpoints/step-4; "
        f"continue with: preftune train --resume {out}" in caplog.text
    )
    assert losses(out) == losses(baseline)[:4]


def test_resume_with_a_changed_config_is_refused_naming_the_keys(baseline, capsys):
    before = (baseline / "metrics.jsonl").read_text()

    code = main(
        [
            "train",
            "--resume",
            str(baseline),
            "--lr",
            "5e-4",
            "--beta",
            "0.2",
            "--log-every",
            "2",
            "--no-progress",
        ]
    )

    assert code == 2
    assert capsys.readouterr().err == (
        f"preftune: config error: --resume {baseline}: the config differs from step-8's in "
        "beta (0.1 -> 0.2), lr (0.001 -> 0.0005), which changes the results; pass "
        "--allow-config-change to resume with it anyway\n"
    )
    assert (baseline / "metrics.jsonl").read_text() == before


def test_resume_of_a_finished_run_says_how_to_train_further(baseline, capsys):
    code = main(["train", "--resume", str(baseline), "--no-progress"])

    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] + "\n" == (
        f"preftune: error: {baseline}/checkpoints/step-8: the run already finished its 8 "
        "steps; to train further, raise --max-steps (or --epochs) and pass "
        "--allow-config-change\n"
    )


def test_resume_of_a_folder_that_is_no_run_is_refused(tmp_path, capsys):
    code = main(["train", "--resume", str(tmp_path), "--no-progress"])

    assert code == 2
    assert capsys.readouterr().err == (
        f"preftune: config error: --resume {tmp_path}: no config.yaml there; "
        "is it a run directory?\n"
    )


def test_finished_run_trains_further_with_a_new_lr_when_allowed(tmp_path, baseline):
    """Linear decay over the new 10 steps, 1 warmup step: lr(k) = 2e-3 * (10 - k) / 9."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run)

    code = main(
        [
            "train",
            "--resume",
            str(run),
            "--max-steps",
            "10",
            "--lr",
            "2e-3",
            "--allow-config-change",
            "--no-progress",
        ]
    )

    assert code == 0
    rows = [row for row in metric_rows(run) if "loss" in row]
    assert rows[:STEPS] == [row for row in metric_rows(baseline) if "loss" in row]
    assert [row["step"] for row in rows[STEPS:]] == [9, 10]
    assert rows[8]["learning_rate"] == pytest.approx(2e-3 * 2 / 9, rel=1e-12)
    assert rows[9]["learning_rate"] == pytest.approx(2e-3 * 1 / 9, rel=1e-12)
    assert sorted(os.listdir(run / "checkpoints")) == ["step-10", "step-8"]
