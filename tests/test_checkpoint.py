"""Checkpoints: what a save holds, atomic writes, retention, and what loading refuses."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from transformers import get_scheduler

from preftune import checkpoint, models
from preftune.checkpoint import CheckpointError, Checkpoints, TrainerState
from preftune.config import ConfigError, TrainConfig
from preftune.data.tokenize import TokenizedPair

PAIRS = [TokenizedPair((1, 5, 6), (7, 2), (8, 9, 2), "data.jsonl", i + 1, "Q") for i in range(4)]


def _trainer(folder, lr=1e-2):
    """The tiny policy with AdamW and a linear schedule, as training builds them."""
    policy, _ = models.load(str(folder))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    return policy, optimizer, scheduler


def _step(policy, optimizer, scheduler):
    """One update, so that the optimizer holds moments and the schedule moves."""
    for i, parameter in enumerate(policy.parameters()):
        parameter.grad = torch.full_like(parameter, 0.01 * (i + 1))
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _save_steps(run, folder, steps, keep=2, **cfg):
    cfg = TrainConfig(keep_checkpoints=keep, save_every=1, **cfg)
    policy, optimizer, scheduler = _trainer(folder)
    saver = Checkpoints(run, cfg)
    saver.restore(policy, optimizer, scheduler, PAIRS, 10)  # fingerprints the pairs
    for step in steps:
        _step(policy, optimizer, scheduler)
        saver.save(step, policy, optimizer, scheduler, skipped_batches=0)
    return saver, policy, optimizer, scheduler


def _resumer(run, **cfg):
    return Checkpoints(run, TrainConfig(resume=str(run), **cfg))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_llama_folder):
    """A run folder with checkpoints step-1 and step-2 (every test gets its own copy)."""
    run = tmp_path_factory.mktemp("saved-run")
    _save_steps(run, tiny_llama_folder, [1, 2], lr=1e-3)
    return run


@pytest.fixture()
def run(tmp_path, saved_run):
    shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_restore_gives_back_weights_optimizer_schedule_and_random_states_exactly(
    tmp_path, tiny_llama_folder
):
    _saver, policy, optimizer, scheduler = _save_steps(tmp_path, tiny_llama_folder, [1, 2])
    expected_draws = (torch.rand(3), random.random(), np.random.rand())
    _step(policy, optimizer, scheduler)  # move everything on past the checkpoint

    fresh, fresh_optimizer, fresh_scheduler = _trainer(tiny_llama_folder)
    state = _resumer(tmp_path, keep_checkpoints=2, save_every=1).restore(
        fresh, fresh_optimizer, fresh_scheduler, PAIRS, 10
    )

    saved = checkpoint.safetensors.torch.load_file(
        tmp_path / "checkpoints/step-2/model.safetensors"
    )
    for name, tensor in fresh.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    moments = [s["exp_avg"] for s in fresh_optimizer.state_dict()["state"].values()]
    assert len(moments) == len(list(fresh.parameters())) and all(m.abs().sum() > 0 for m in moments)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 2
    assert fresh_scheduler.last_epoch == 2
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 8 / 9)  # linear decay
    assert state == TrainerState(step=2, skipped_batches=0)
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_tied_embeddings_stay_tied_after_restore(tmp_path, tiny_llama_folder):
    _save_steps(tmp_path, tiny_llama_folder, [1])
    fresh, optimizer, scheduler = _trainer(tiny_llama_folder)
    _resumer(tmp_path, save_every=1).restore(fresh, optimizer, scheduler, PAIRS, 10)

    assert fresh.lm_head.weight.data_ptr() == fresh.get_input_embeddings().weight.data_ptr()


def test_only_the_newest_k_checkpoints_are_kept(tmp_path, tiny_llama_folder):
    _save_steps(tmp_path, tiny_llama_folder, [1, 2, 3, 4], keep=2)

    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-3", "step-4"]


def test_manifest_lists_every_file_with_its_size_and_checksum(run):
    folder = run / "checkpoints" / "step-1"

    manifest = json.loads((folder / "manifest.json").read_text())

    assert sorted(manifest) == [
        "config.yaml",
        "metrics.jsonl",
        "model.safetensors",
        "optimizer.pt",
        "rng.json",
        "trainer_state.json",
    ]
    assert manifest["rng.json"]["bytes"] == (folder / "rng.json").stat().st_size
    assert checkpoint.verify(folder) is None
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 1


def test_interrupted_write_leaves_the_previous_checkpoint_and_no_staging_folder(
    tmp_path, tiny_llama_folder, monkeypatch
):
    saver, policy, optimizer, scheduler = _save_steps(tmp_path, tiny_llama_folder, [2])

    def second_ctrl_c(step):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "signal_during_save", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        saver.save(4, policy, optimizer, scheduler, skipped_batches=0)

    assert os.listdir(tmp_path / "checkpoints") == ["step-2"]
    assert checkpoint.newest_valid(tmp_path) == tmp_path / "checkpoints" / "step-2"


def test_full_disk_during_save_names_the_checkpoint_left_intact(
    tmp_path, tiny_llama_folder, monkeypatch
):
    saver, policy, optimizer, scheduler = _save_steps(tmp_path, tiny_llama_folder, [2])

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write", disk_full)
    with pytest.raises(CheckpointError) as caught:
        saver.save(4, policy, optimizer, scheduler, skipped_batches=0)

    step2 = tmp_path / "checkpoints" / "step-2"
    assert str(caught.value) == (
        f"{tmp_path / 'checkpoints' / 'step-4'}: could not write the checkpoint "
        f"(No space left on device); {step2} is intact"
    )
    assert os.listdir(tmp_path / "checkpoints") == ["step-2"]
    assert checkpoint.verify(step2) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: (f / "manifest.json").unlink(), "no manifest.json (the write did not finish)"),
        (lambda f: (f / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (
            lambda f: (f / "rng.json").write_bytes((f / "rng.json").read_bytes()[:100]),
            "rng.json has 100 bytes, expected ",
        ),
        (
            lambda f: (f / "model.safetensors").write_bytes(
                b"\0" + (f / "model.safetensors").read_bytes()[1:]
            ),
            "model.safetensors does not match its checksum",
        ),
    ],
    ids=["no-manifest", "missing-file", "truncated", "flipped-byte"],
)
def test_damaged_newest_checkpoint_is_skipped_with_a_message(run, caplog, damage, reason):
    damage(run / "checkpoints" / "step-2")

    with caplog.at_level(logging.WARNING):
        chosen = checkpoint.newest_valid(run)

    assert chosen == run / "checkpoints" / "step-1"
    assert f"skipping checkpoint {run / 'checkpoints' / 'step-2'}: {reason}" in caplog.text


def test_run_without_a_complete_checkpoint_cannot_be_resumed(run):
    (run / "checkpoints" / "step-2" / "manifest.json").unlink()
    (run / "checkpoints" / "step-1" / "optimizer.pt").unlink()

    with pytest.raises(CheckpointError) as caught:
        _resumer(run)

    assert str(caught.value) == (
        f"{run}: no complete checkpoint to resume from (skipped step-2: no manifest.json "
        "(the write did not finish); step-1: optimizer.pt is missing)"
    )


def test_code_pickled_into_the_optimizer_state_is_refused_not_run(run, tiny_llama_folder):
    folder = run / "checkpoints" / "step-2"
    marker = run / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload()}, protocol=2))
    manifest = json.loads((folder / "manifest.json").read_text())  # make it look complete
    manifest["optimizer.pt"] = {
        "bytes": (folder / "optimizer.pt").stat().st_size,
        "sha256": checkpoint._sha256(folder / "optimizer.pt"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    policy, optimizer, scheduler = _trainer(tiny_llama_folder)

    with pytest.raises(CheckpointError, match="cannot be loaded"):
        _resumer(run, lr=1e-3, save_every=1).restore(policy, optimizer, scheduler, PAIRS, 10)

    assert not marker.exists()


def test_changed_pairs_are_refused_on_resume(run, tiny_llama_folder):
    policy, optimizer, scheduler = _trainer(tiny_llama_folder)

    with pytest.raises(CheckpointError) as caught:
        _resumer(run, lr=1e-3).restore(policy, optimizer, scheduler, PAIRS[:3], 10)

    assert (
        "the training pairs differ from those the checkpoint was trained on "
        "(3 pairs now, 4 then); pass --allow-config-change" in str(caught.value)
    )


def test_finished_run_cannot_be_resumed_without_more_steps(run, tiny_llama_folder):
    policy, optimizer, scheduler = _trainer(tiny_llama_folder)

    with pytest.raises(
        CheckpointError,
        match="the run already finished its 2 steps; to train further, raise --max-steps",
    ):
        _resumer(run, lr=1e-3).restore(policy, optimizer, scheduler, PAIRS, 2)


def test_rows_logged_after_the_checkpoint_move_aside_on_resume(tmp_path, tiny_llama_folder):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (tmp_path / "eval_pairs.jsonl").write_text('{"step": 0, "h": 0.0}\n')
    _save_steps(tmp_path, tiny_llama_folder, [1])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.6}\n{"step": 3, "lo')  # the crash cut the last row short
    with open(tmp_path / "eval_pairs.jsonl", "a") as f:
        f.write('{"step": 3, "h": 0.5}\n')
    policy, optimizer, scheduler = _trainer(tiny_llama_folder)

    _resumer(tmp_path, save_every=1).restore(policy, optimizer, scheduler, PAIRS, 10)

    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.7}\n'
    assert (tmp_path / "metrics.replaced.jsonl").read_text() == (
        '{"step": 2, "loss": 0.6}\n{"step": 3, "lo\n'
    )
    assert (tmp_path / "eval_pairs.jsonl").read_text() == '{"step": 0, "h": 0.0}\n'
    assert (tmp_path / "eval_pairs.replaced.jsonl").read_text() == '{"step": 3, "h": 0.5}\n'


def test_resume_removes_abandoned_staging_and_broken_newer_checkpoints(run, tiny_llama_folder):
    (run / "checkpoints" / "step-2" / "manifest.json").unlink()
    (run / "checkpoints" / ".staging-step-3-x1y2").mkdir()
    policy, optimizer, scheduler = _trainer(tiny_llama_folder)

    state = _resumer(run, lr=1e-3).restore(policy, optimizer, scheduler, PAIRS, 10)

    assert state.step == 1
    assert os.listdir(run / "checkpoints") == ["step-1"]


# The config on resume


def test_changed_keys_name_what_changes_results_and_ignore_the_rest():
    saved = TrainConfig(lr=1e-3, output="a").to_dict()
    cfg = TrainConfig(
        lr=2e-3, beta=0.2, output="b", log_every=5, progress=False, save_every=7, resume="a"
    )

    assert checkpoint.changed_keys(saved, cfg) == ["beta (0.1 -> 0.2)", "lr (0.001 -> 0.002)"]


def test_key_missing_from_an_older_checkpoint_compares_against_its_default():
    saved = TrainConfig().to_dict()
    del saved["seed"]

    assert checkpoint.changed_keys(saved, TrainConfig()) == []
    assert checkpoint.changed_keys(saved, TrainConfig(seed=3)) == ["seed (0 -> 3)"]


def test_changed_config_is_refused_naming_the_keys(run):
    with pytest.raises(ConfigError) as caught:
        _resumer(run, lr=5e-4, max_steps=20)

    assert str(caught.value) == (
        f"--resume {run}: the config differs from step-2's in lr (0.001 -> 0.0005), "
        "max_steps (-1 -> 20), which changes the results; pass --allow-config-change to "
        "resume with it anyway"
    )
    assert _resumer(run, lr=5e-4, max_steps=20, allow_config_change=True).newest == (
        run / "checkpoints" / "step-2"
    )


def test_resume_values_put_the_given_values_over_the_saved_config(tmp_path):
    saved = TrainConfig(lr=1e-3, batch_size=3, output="elsewhere", allow_config_change=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved.to_dict()))

    values = checkpoint.resume_values({"resume": str(tmp_path), "progress": False})

    assert (values["lr"], values["batch_size"], values["progress"]) == (1e-3, 3, False)
    assert values["output"] == str(tmp_path)  # the run is where it is now
    assert values["allow_config_change"] is False  # never inherited from an earlier resume


def test_resume_refuses_an_output_that_names_another_folder(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TrainConfig().to_dict()))

    with pytest.raises(ConfigError, match=f"--output other differs from --resume {tmp_path}"):
        checkpoint.resume_values({"resume": str(tmp_path), "output": "other"})


def test_resume_of_a_folder_without_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml there; is it a run directory"):
        checkpoint.resume_values({"resume": str(tmp_path)})


def test_metrics_cut_short_by_a_full_disk_are_completed_from_the_checkpoint(
    tmp_path, tiny_llama_folder
):
    rows = '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'
    (tmp_path / "metrics.jsonl").write_text(rows)
    _save_steps(tmp_path, tiny_llama_folder, [2])
    (tmp_path / "metrics.jsonl").write_text(rows[:30])  # the disk filled up inside row 2
    policy, optimizer, scheduler = _trainer(tiny_llama_folder)

    _resumer(tmp_path, save_every=1).restore(policy, optimizer, scheduler, PAIRS, 10)

    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert not (tmp_path / "metrics.replaced.jsonl").exists()
