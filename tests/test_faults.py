"""Faults a run meets: NaN or inf steps, full disks, missing inputs, signals, hostile paths."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import yaml
from training_runs import STEPS, assert_same_weights, losses, metric_rows, train_args, write_pairs
from transformers import AutoTokenizer

from preftune import checkpoint, faults
from preftune.cli import main
from preftune.config import TrainConfig, build_config
from preftune.data.pipeline import prepare_data
from preftune.data.report import DataReport
from preftune.metrics import MetricsLog
from preftune.train import batch_indices


@pytest.fixture()
def pairs(tmp_path):
    return write_pairs(tmp_path)


def _pairs_of_step(run, model_folder, step):
    """``source:record`` of every pair of 1-based step ``step``, as the run ordered them."""
    cfg = build_config(yaml.safe_load((run / "config.yaml").read_text()))
    train_pairs, _ = prepare_data(cfg, AutoTokenizer.from_pretrained(model_folder), DataReport())
    return [
        f"{train_pairs[i].source}:{train_pairs[i].record}"
        for batch in batch_indices(cfg, train_pairs, step - 1)
        for i in batch
    ]


# NaN and inf


def test_nan_loss_stops_the_run_naming_the_step_and_its_pairs(
    tmp_path, tiny_llama_folder, pairs, monkeypatch, capsys
):
    out = tmp_path / "run"
    monkeypatch.setenv("PREFTUNE_TEST_NAN_AT_STEP", "3")

    code = main(train_args(tiny_llama_folder, pairs, out))

    err = capsys.readouterr().err.splitlines()[-1]
    batch = ", ".join(_pairs_of_step(out, tiny_llama_folder, 3))
    assert code == 2
    assert err == (
        f"preftune: error: step 3: loss nan and grad_norm nan; the update was not applied and "
        f"training stopped (the last checkpoint {out}/checkpoints/step-2 is intact). Pairs of "
        f"the batch: {batch}. Pass --on-nan skip to skip such batches instead"
    )
    assert batch.count("train.jsonl:") == 2
    assert os.listdir(out / "checkpoints") == ["step-2"]
    assert checkpoint.verify(out / "checkpoints" / "step-2") is None
    assert [step for step, _ in losses(out)] == [1, 2]  # rows before the fault are all kept


def test_on_nan_skip_drops_the_batch_without_an_update_and_counts_it(
    tmp_path, tiny_llama_folder, pairs, monkeypatch
):
    out = tmp_path / "run"
    monkeypatch.setenv("PREFTUNE_TEST_NAN_AT_STEP", "3")

    code = main(
        train_args(
            tiny_llama_folder,
            pairs,
            out,
            "--on-nan",
            "skip",
            "--save-every",
            "1",
            "--keep-checkpoints",
            str(STEPS),
        )
    )

    assert code == 0
    rows = {row["step"]: row for row in metric_rows(out) if "loss" in row}
    assert (rows[3]["loss"], rows[3]["grad_norm"]) == ("nan", "nan")
    assert [rows[s]["skipped_batches"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(isinstance(rows[s]["loss"], float) for s in (4, 5, 6, 7, 8))
    folders = out / "checkpoints"
    # Step 3 applied nothing: its weights are step 2's.
    assert_same_weights(
        folders / "step-2" / "model.safetensors", folders / "step-3" / "model.safetensors"
    )
    with pytest.raises(AssertionError):
        assert_same_weights(
            folders / "step-3" / "model.safetensors", folders / "step-4" / "model.safetensors"
        )


def test_finite_check_sees_nan_and_inf_in_any_of_its_values():
    import torch

    assert faults.is_finite(torch.tensor(1.0), torch.tensor(2.0))
    assert not faults.is_finite(torch.tensor(1.0), torch.tensor(float("inf")))
    assert not faults.is_finite(torch.tensor(float("nan")), torch.tensor(2.0))


# A full disk


def test_full_disk_while_logging_metrics_keeps_every_earlier_file(
    tmp_path, tiny_llama_folder, pairs, monkeypatch, capsys
):
    out = tmp_path / "run"
    write = MetricsLog.write

    def disk_full_at_step_5(self, step, values):
        if step == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, step, values)

    monkeypatch.setattr(MetricsLog, "write", disk_full_at_step_5)

    assert main(train_args(tiny_llama_folder, pairs, out)) == 2

    assert capsys.readouterr().err.splitlines()[-1] == (
        f"preftune: error: cannot write the run directory {out}: No space left on device; "
        "files written before this are intact; once that is fixed, continue with: "
        f"preftune train --resume {out}"
    )
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4]
    assert json.loads((out / "data_report.json").read_text())["num_read"] == 14
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]

    monkeypatch.undo()  # room again
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert [step for step, _ in losses(out)] == list(range(1, STEPS + 1))


def test_full_disk_while_saving_a_checkpoint_names_the_one_left_intact(
    tmp_path, tiny_llama_folder, pairs, monkeypatch, capsys
):
    out = tmp_path / "run"
    write = checkpoint._write

    def disk_full_in_step_4(path, data):
        if path.parent.name.startswith(".staging-step-4-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write", disk_full_in_step_4)

    assert main(train_args(tiny_llama_folder, pairs, out)) == 2

    assert capsys.readouterr().err.splitlines()[-1] == (
        f"preftune: error: {out}/checkpoints/step-4: could not write the checkpoint "
        f"(No space left on device); {out}/checkpoints/step-2 is intact"
    )
    assert os.listdir(out / "checkpoints") == ["step-2"]
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4]


# Inputs and the output folder, checked before anything is written


def test_missing_model_is_reported_before_the_run_directory_is_made(tmp_path, pairs, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-model"

    code = main(train_args(missing, pairs, out))

    assert code == 2
    assert capsys.readouterr().err == (
        f"preftune: error: model {missing} not found: no such folder or file\n"
    )
    assert not out.exists()


def test_missing_data_file_is_reported_before_the_model_loads(
    tmp_path, tiny_llama_folder, pairs, capsys
):
    out = tmp_path / "run"
    missing = tmp_path / "missing.jsonl"

    code = main(train_args(tiny_llama_folder, (missing, pairs[1]), out))

    assert code == 2
    assert capsys.readouterr().err == f"preftune: error: {missing}: file not found\n"
    assert not out.exists()


def test_output_below_a_file_is_refused_with_the_reason(tmp_path, tiny_llama_folder, pairs, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")

    code = main(train_args(tiny_llama_folder, pairs, blocker / "run"))

    assert code == 2
    assert capsys.readouterr().err == (
        f"preftune: error: {blocker}/run: cannot write the run directory (Not a directory)\n"
    )
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_folder_is_refused(tmp_path, tiny_llama_folder, pairs, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)

    code = main(train_args(tiny_llama_folder, pairs, locked / "run"))

    assert code == 2
    assert "cannot write the run directory (Permission denied)" in capsys.readouterr().err


def test_shell_syntax_and_tilde_in_config_paths_stay_literal(
    tmp_path, tiny_llama_folder, pairs, monkeypatch
):
    """Paths are opened as written: nothing runs a shell or expands ``~`` in --output."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "shell-ran"
    data = tmp_path / "pairs $(touch shell-ran).jsonl"
    data.write_bytes(pairs[0].read_bytes())
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(data),
                "eval_data": str(pairs[1]),
                "output": "~/run `touch shell-ran`",
            }
        )
    )

    code = main(
        [
            "train",
            "--config",
            str(config),
            "--model",
            str(tiny_llama_folder),
            "--max-steps",
            "1",
            "--eval-every",
            "0",
            "--num-samples",
            "0",
            "--no-progress",
        ]
    )

    assert code == 0
    run = tmp_path / "~" / "run `touch shell-ran`"
    assert (run / "checkpoints" / "step-1").is_dir()
    report = json.loads((run / "data_report.json").read_text())
    assert report["read_by_source"] == {str(data): 12, str(pairs[1]): 2}
    assert not marker.exists()


# Signals


def test_first_signal_asks_to_stop_and_second_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    stop = faults.StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is previous


def test_permission_error_outside_the_run_directory_keeps_its_own_message(tmp_path):
    cfg = TrainConfig(output=str(tmp_path / "run"))

    with pytest.raises(PermissionError), faults.output_errors(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "cache" / "x"))


def test_permission_error_inside_the_run_directory_says_what_is_kept(tmp_path):
    cfg = TrainConfig(output=str(tmp_path / "run"))

    with pytest.raises(faults.OutputError) as caught, faults.output_errors(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "m.jsonl"))

    assert str(caught.value) == (
        f"cannot write the run directory {tmp_path / 'run'}: Permission denied; "
        "files written before this are intact"
    )
