"""Data parallelism: two processes (gloo on 127.0.0.1) with 1 pair each train exactly like one
process with 2 pairs; the step stream, slicing and sharding that make it so; resuming."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_runs import REPO, metric_rows, train_args

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.distributed import DistributedError, Engine
from preftune.train import step_batches, train

STEPS = 3


class _Rank(Engine):
    """The slicing and sharding of process ``rank`` of ``world_size``, without collectives."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size


def test_each_step_reads_the_single_process_stream_cut_into_one_slice_per_process():
    """1 pair x 2 processes x accumulation 2 reads what 2 pairs x accumulation 2 reads."""
    two = TrainConfig(batch_size=1, grad_accum=2, seed=5)
    one = TrainConfig(batch_size=2, grad_accum=2, seed=5)
    lengths = tuple(range(10, 20))
    for step in range(7):  # past an epoch boundary (10 pairs, 4 per step)
        whole = step_batches(two, 10, step, lengths, world_size=2)
        assert whole == step_batches(one, 10, step, lengths)
        parts = [[_Rank(r, 2).slice(m) for m in whole] for r in range(2)]
        assert [a + b for a, b in zip(*parts)] == whole  # slices cover each micro-batch
        assert all(len(m) == 1 for part in parts for m in part)


def test_shards_are_equal_contiguous_and_gather_back_in_order():
    items = list(range(5))
    shares = [_Rank(r, 3).shard(items) for r in range(3)]
    assert shares == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]  # the last padded by a repeat
    assert [x for share, _ in shares for x in share][: len(items)] == items
    assert _Rank(2, 4).shard([7, 8]) == ([8], 0)  # more processes than items: padding only
    assert _Rank(0, 2).shard([]) == ([], 0)


def test_num_processes_without_a_launcher_is_refused(tiny_llama_folder, tmp_path):
    cfg = TrainConfig(model=str(tiny_llama_folder), output=str(tmp_path / "run"), num_processes=2)
    with pytest.raises(DistributedError, match="--num-processes 2"):
        train(cfg)


def _ddp(args: list[str], cache) -> str:
    """``preftune ARGS`` (with --num-processes 2 it starts torch.distributed.run itself).

    Returns stdout and stderr together; fails the test on a non-zero exit unless the args
    ask to be stopped.
    """
    env = {**os.environ, "PREFTUNE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "preftune", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env=env, check=False)
    output = proc.stdout + proc.stderr
    stopping = "PREFTUNE_TEST_SIGNAL_IN_SAVE" in os.environ
    assert (proc.returncode != 0) == stopping, output[-3000:]
    return output


def _assert_same_run(single, parallel) -> None:
    rows_a, rows_b = metric_rows(single), metric_rows(parallel)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (a["step"], key)
    held_a = [json.loads(x) for x in (single / "eval_pairs.jsonl").read_text().splitlines()]
    held_b = [json.loads(x) for x in (parallel / "eval_pairs.jsonl").read_text().splitlines()]
    assert [(r["step"], r["record"]) for r in held_a] == [(r["step"], r["record"]) for r in held_b]
    for a, b in zip(held_a, held_b):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
    weights_a = load_file(single / "model" / "model.safetensors")
    weights_b = load_file(parallel / "model" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The in-process runs here use one thread, as each of the two processes does."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _args(model, data, out, batch_size: int, grad_accum: int, *extra: str) -> list[str]:
    # AdamW divides by sqrt(v): where a gradient is ~0, its step turns the float noise of
    # another summation order into a step of ~lr, so lr stays small (as in test_train's
    # accumulation test); at 1e-3 one weight in a thousand differs by ~2e-6.
    return train_args(model, data, out, "--max-steps", str(STEPS), "--batch-size",
                      str(batch_size), "--grad-accum", str(grad_accum), "--threads", "1",
                      "--eval-every", "2", "--lr", "1e-4", *extra)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_processes_with_one_pair_equal_one_process_with_two(
    tmp_path, tiny_llama_folder, pairs, grad_accum, monkeypatch
):
    """Loss, every metric, held-out rows and updated weights agree to 1e-6 over 3 steps.

    Each run computes its own reference log-probs (separate caches): in two processes each
    computes half of them and they are gathered.
    """
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache-single"))
    single = tmp_path / "single"
    assert main(_args(tiny_llama_folder, pairs, single, 2, grad_accum)) == 0

    parallel = tmp_path / "parallel"
    output = _ddp(_args(tiny_llama_folder, pairs, parallel, 1, grad_accum,
                        "--num-processes", "2"), tmp_path / "cache-parallel")
    assert "training on MULTI_CPU x2 (cpu)" in output
    _assert_same_run(single, parallel)
    saved = yaml.safe_load((parallel / "config.yaml").read_text())
    assert saved["num_processes"] == 2 and saved["batch_size"] == 1
    # One voice: process 0 prints each step's line once.
    assert len(re.findall(r"^step 1/3 \|", output, re.MULTILINE)) == 1
    epoch = [r["epoch"] for r in metric_rows(parallel) if "epoch" in r]
    assert epoch == pytest.approx([s * 2 * grad_accum / 12 for s in range(1, STEPS + 1)])
    assert all(0 <= r.get("rewards/accuracies", 0) <= 1 for r in metric_rows(parallel))
    assert math.isfinite(metric_rows(parallel)[-1]["eval/loss"])


def test_a_stopped_two_process_run_resumes_under_the_same_launcher(
    tmp_path, tiny_llama_folder, pairs, monkeypatch
):
    """Stopped after step 2 (a SIGINT while step 2 saves), resumed by `--resume` alone."""
    args = ["--max-steps", "5", "--save-every", "2", "--batch-size", "1", "--threads", "1"]
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    single = tmp_path / "single"
    assert main(train_args(tiny_llama_folder, pairs, single, *args, "--batch-size", "2")) == 0

    parallel = tmp_path / "parallel"
    monkeypatch.setenv("PREFTUNE_TEST_SIGNAL_IN_SAVE", "2:SIGINT")
    stopped = _ddp(train_args(tiny_llama_folder, pairs, parallel, *args, "--num-processes", "2"),
                   tmp_path / "cache")
    monkeypatch.delenv("PREFTUNE_TEST_SIGNAL_IN_SAVE")
    assert "SIGINT: stopped after step 2" in stopped
    assert sorted(p.name for p in (parallel / "checkpoints").iterdir()) == ["step-2"]
    resumed = _ddp(["train", "--resume", str(parallel), "--no-progress"], tmp_path / "cache")
    assert "resuming from" in resumed and "MULTI_CPU x2" in resumed
    _assert_same_run(single, parallel)


def test_ctrl_c_stops_every_process_after_one_step_with_a_checkpoint(
    tmp_path, tiny_llama_folder, pairs
):
    """A terminal's Ctrl-C: SIGINT to the process group of `preftune train --num-processes 2`."""
    out = tmp_path / "run"
    env = {**os.environ, "PREFTUNE_CACHE": str(tmp_path / "cache"),
           "PREFTUNE_TEST_STEP_DELAY": "0.5"}
    args = train_args(tiny_llama_folder, pairs, out, "--max-steps", "40", "--save-every", "100",
                      "--batch-size", "1", "--threads", "1", "--num-processes", "2")
    proc = subprocess.Popen([sys.executable, "-m", "preftune", *args], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or '"loss"' not in metrics.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "no step was logged"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)

    assert proc.returncode == 130, output[-3000:]
    stopped = int(re.search(r"SIGINT: stopped after step (\d+); checkpoint saved", output)[1])
    assert stopped < 40
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped}"]
    assert output.count("stopped after step") == 1  # process 0 reports, the others stop
