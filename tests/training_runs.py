"""Helpers for tests that train the tiny model end to end and compare runs.

Runs are 8 optimizer steps of 2 pairs over 12 pairs, so that they cross an epoch boundary,
with a checkpoint every 2 steps and an evaluation every 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# Keys that measure the machine, not the computation: they differ between any two runs.
TIMING_KEYS = frozenset({"tokens_per_second", "pairs_per_second", "step_seconds"})

TEXTS = [
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Boil it for nine minutes.", " No."),
    ("Q: colour?", " Red", " The quick brown fox jumps over the lazy dog."),
    ("Q: a number?", " Seven", " I would rather not say."),
    ("Q: a pet?", " A cat, since it is quiet.", " Dog"),
]


def write_pairs(folder: Path) -> tuple[Path, Path]:
    """12 training pairs and 2 held-out pairs as JSON Lines; returns both paths."""
    rows = [
        {"prompt": f"{p} ({i})", "chosen": c, "rejected": r} for i in range(3) for p, c, r in TEXTS
    ]
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return train, held


def train_args(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    """``preftune train`` arguments for a small run; ``extra`` flags are appended."""
    train, held = data
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(train),
        "--eval-data",
        str(held),
        "--output",
        str(out),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--num-samples",
        "0",
        "--no-progress",
        # The pytest process's thread count, so that subprocess and in-process runs agree.
        "--threads",
        str(torch.get_num_threads()),
        *extra,
    ]


def start(args: list[str], **env: str) -> subprocess.Popen:
    """``python -m preftune ARGS`` in a subprocess, with extra environment variables."""
    return subprocess.Popen(
        [sys.executable, "-m", "preftune", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timing keys."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in metric_rows(run) if "loss" in row]


def assert_same_weights(a: Path, b: Path) -> None:
    """The two safetensors files hold bit-identical tensors under the same names."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def assert_same_steps(a: tuple[list[dict], dict], b: tuple[list[dict], dict], rtol: float) -> None:
    """Two in-process trainings, each (metrics of every step, named parameters after them),
    agree on each step's loss, margin, chosen log-prob and gradient norm, and on every
    weight."""
    (values_a, params_a), (values_b, params_b) = a, b
    assert len(values_a) == len(values_b)
    for x, y in zip(values_a, values_b):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=1e-6), key
    for name, value in params_a.items():
        torch.testing.assert_close(value, params_b[name], rtol=rtol, atol=1e-6)
