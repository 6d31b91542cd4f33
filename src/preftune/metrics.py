"""Metric math and sinks (metrics.jsonl, TensorBoard, one console line per logging step).

Metric names follow what the field already charts: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``, with the mean response lengths in tokens as ``lengths/chosen`` and
``lengths/rejected``; evaluation metrics carry the prefix ``eval/``.

``rewards/accuracies`` counts a pair as 1 when its chosen reward is above its rejected
reward, 0 when below, and 0.5 on a tie: a reward margin within ``TIE_TOLERANCE`` of zero.
With that rule a policy equal to its reference (every reward 0) scores 0.5, the accuracy of
a coin flip, instead of 0. The tolerance absorbs float noise of recomputing the same
log-probs in another batch layout (about 1e-6 nats), so such a policy scores 0.5 also when
its reference log-probs were precomputed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

TIE_TOLERANCE = 1e-5


def reward_accuracies(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy: 1 if chosen wins, 0.5 on a tie, 0 otherwise. Shape: (batch,)."""
    margins = chosen_rewards - rejected_rewards
    tie = margins.abs() <= TIE_TOLERANCE
    return torch.where(tie, 0.5, (margins > 0).float())


def pair_sums(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    components: dict[str, torch.Tensor],
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-batch sums of the per-pair metrics; divide by the pair count to average.

    ``lengths/chosen`` and ``lengths/rejected`` are response lengths in tokens, so that a
    change of a sequence log-prob can be read per token.
    Kept as tensors so a training step does not synchronise with the host until it logs.
    """
    sums = {
        "loss": losses.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": reward_accuracies(chosen_rewards, rejected_rewards).sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
        "lengths/chosen": chosen_lengths.sum().float(),
        "lengths/rejected": rejected_lengths.sum().float(),
    }
    for name, values in components.items():
        sums[f"loss/{name}"] = values.detach().sum()
    return sums


def add_sums(total: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    for name, value in sums.items():
        total[name] = total[name] + value if name in total else value


def averages(total: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    return {name: float(value) / count for name, value in total.items()}


class MetricsLog:
    """Appends one JSON object per logging step to ``metrics.jsonl`` and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NoLog:
    """Writes nothing: what the processes other than process 0 log to."""

    def write(self, step: int, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def console_line(step: int, total: int, values: dict[str, float]) -> str:
    """The compact line printed at each logging step."""
    parts = [f"step {step}/{total}"]
    for name, fmt in (
        ("loss", ".4f"),
        ("rewards/margins", "+.3f"),
        ("rewards/accuracies", ".2f"),
        ("grad_norm", ".3f"),
        ("learning_rate", ".2e"),
        ("tokens_per_second", ".0f"),
    ):
        if name in values:
            parts.append(f"{name.split('/')[-1]} {format(values[name], fmt)}")
    return " | ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value
