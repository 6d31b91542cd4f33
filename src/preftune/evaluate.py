"""Held-out evaluation: the loss and reward metrics over a set of pairs, plus per-pair rows.

Under several processes each evaluates an equal share of the pairs (the last share padded
with repeats that are computed but not counted, so every process makes the same calls); the
sums are added over processes and the rows gathered in pair order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from preftune.data.tokenize import TokenizedPair
from preftune.distributed import Engine
from preftune.forward import StepOptions, pair_forward
from preftune.losses import LossParams
from preftune.metrics import add_sums, averages


@dataclass
class EvalResult:
    metrics: dict[str, float]  # names without the "eval/" prefix
    pairs: list[dict]  # one row per pair: where it came from and where it sits on the loss curve


def evaluate(
    policy: nn.Module,
    reference: nn.Module | None,
    pairs: list[TokenizedPair],
    params: LossParams,
    batch_size: int,
    pad_id: int,
    progress: bool = False,
    options: StepOptions = StepOptions(),
    engine: Engine | None = None,
) -> EvalResult:
    """Loss and reward metrics of ``policy`` (against ``reference``) on ``pairs``."""
    engine = engine or Engine()
    all_pairs = pairs
    pairs, counted = engine.shard(all_pairs)  # this process's share; all of them for one
    was_training = policy.training
    policy.eval()
    totals: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    batches = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval", unit="batch", leave=False)
    with torch.no_grad():
        for start in batches:
            chunk = pairs[start : start + batch_size]
            out = pair_forward(policy, reference, chunk, params, pad_id, options)
            keep = slice(0, max(0, min(len(chunk), counted - start)))  # padding is not counted
            add_sums(totals, out.metric_sums(keep))
            h = out.policy_chosen_logps - out.policy_rejected_logps
            if out.reference_chosen_logps is not None:
                h = h - (out.reference_chosen_logps - out.reference_rejected_logps)
            for i, pair in enumerate(chunk[keep]):
                rows.append({
                    "source": pair.source,
                    "record": pair.record,
                    "h": float(h[i]),
                    "margin": float(out.loss.chosen_rewards[i] - out.loss.rejected_rewards[i]),
                    "chosen_reward": float(out.loss.chosen_rewards[i]),
                    "rejected_reward": float(out.loss.rejected_rewards[i]),
                    "loss": float(out.loss.losses[i]),
                    "policy_chosen_logps": float(out.policy_chosen_logps[i]),
                    "policy_rejected_logps": float(out.policy_rejected_logps[i]),
                })
    policy.train(was_training)
    totals = engine.sum(totals)
    return EvalResult(averages(totals, len(all_pairs)), engine.gather_objects(rows))
