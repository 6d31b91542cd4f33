"""The DPO forward for one batch of pairs: log-probs of both models, then the loss.

Shared by training, evaluation and scoring so that there is one implementation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from preftune.data.collate import PairBatch
from preftune.logps import sequence_logps
from preftune.losses import LossOutput, LossParams, compute_loss


@dataclass
class PairForward:
    loss: LossOutput
    policy_chosen_logps: torch.Tensor  # (B,), differentiable in training
    policy_rejected_logps: torch.Tensor  # (B,)
    reference_chosen_logps: torch.Tensor | None  # (B,), None for reference-free losses
    reference_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor  # (B,)
    rejected_lengths: torch.Tensor  # (B,)


def reference_logps(reference: nn.Module | None, batch: PairBatch) -> torch.Tensor | None:
    """Reference log-probs of the 2B rows, without gradients; None without a reference."""
    if reference is None:
        return None
    with torch.no_grad():
        return sequence_logps(reference, batch)


def pair_forward(
    policy: nn.Module, reference: nn.Module | None, batch: PairBatch, params: LossParams
) -> PairForward:
    """One policy pass over chosen and rejected stacked (2B rows), one reference pass."""
    b = batch.num_pairs
    policy_logps = sequence_logps(policy, batch)  # (2B,)
    ref_logps = reference_logps(reference, batch)  # (2B,) or None
    lengths = batch.lengths()  # (2B,)
    ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:b], ref_logps[b:])
    loss = compute_loss(
        params,
        policy_logps[:b],
        policy_logps[b:],
        ref_chosen,
        ref_rejected,
        lengths[:b],
        lengths[b:],
    )
    return PairForward(
        loss, policy_logps[:b], policy_logps[b:], ref_chosen, ref_rejected, lengths[:b], lengths[b:]
    )
