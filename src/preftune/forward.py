"""The DPO forward for a list of pairs: log-probs of both models, then the loss.

Shared by training, evaluation and scoring, so there is one implementation of it. How the
pairs are laid out is a switchable choice (:class:`StepOptions`); every layout gives the
same sequence log-probs (tests hold them to the naive path at 1e-5):

- ``packing`` (with ``prefix_sharing``): the ``[prompt][chosen][rejected]`` rows of all the
  pairs end to end in one row without padding, attention computed pair by pair
  (:mod:`preftune.attention`), for models that pass :func:`preftune.logps.packing_is_exact`;
  else
- ``prefix_sharing``: one row ``[prompt][chosen][rejected]`` per pair, for models that pass
  the self-check in :func:`preftune.logps.shared_prefix_is_exact`; else
- ``concat_forward``: chosen and rejected rows stacked, one call per model; else
- two calls per model, chosen rows then rejected rows (the naive layout).

Reference log-probs come from the pairs themselves when they were precomputed
(:mod:`preftune.reference`), else from the reference model without gradients.

``autocast`` runs the model calls under ``torch.autocast`` in bfloat16; log-probs stay
float32 (see :mod:`preftune.logps`). A model handed to a distributed engine is scored
through the engine's wrapper (:func:`route`), so that the engine sees every forward pass.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from preftune.data.collate import (
    PairBatch,
    collate_packed,
    collate_pairs,
    collate_sequences,
    collate_shared_prefix,
)
from preftune.data.tokenize import TokenizedPair
from preftune.logps import (
    head_only_is_exact,
    packing_is_exact,
    sequence_logps,
    shared_prefix_is_exact,
)
from preftune.losses import LossOutput, LossParams, compute_loss
from preftune.metrics import pair_sums


@dataclass(frozen=True)
class StepOptions:
    """How a step computes log-probs; each switch is exact, so all default to on."""

    concat_forward: bool = True
    head_only: bool = True
    prefix_sharing: bool = True
    autocast: bool = False  # bfloat16 autocast around model calls: faster, not exact
    packing: bool = True  # prefix-shared rows end to end in one row (needs prefix_sharing)


AUTOCAST_DTYPE = torch.bfloat16
_routes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def route(model: nn.Module, wrapped: nn.Module) -> None:
    """Score ``model`` through ``wrapped`` from now on: an engine's wrapper (DDP, FSDP, ...)
    around ``SequenceLogps(model)``."""
    _routes[model] = wrapped


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``enabled``, else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPE)


@dataclass
class PairForward:
    loss: LossOutput
    policy_chosen_logps: torch.Tensor  # (B,), differentiable in training
    policy_rejected_logps: torch.Tensor  # (B,)
    reference_chosen_logps: torch.Tensor | None  # (B,), None for reference-free losses
    reference_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor  # (B,)
    rejected_lengths: torch.Tensor  # (B,)
    num_tokens: int  # real tokens of the pairs, as the stacked layout reads them

    def metric_sums(self, keep: slice = slice(None)) -> dict[str, torch.Tensor]:
        """Sums of the per-pair metrics over the pairs in ``keep`` (see metrics.pair_sums)."""
        return pair_sums(
            self.loss.losses[keep], self.loss.chosen_rewards[keep],
            self.loss.rejected_rewards[keep], self.policy_chosen_logps[keep],
            self.policy_rejected_logps[keep],
            {name: values[keep] for name, values in self.loss.components.items()},
            self.chosen_lengths[keep], self.rejected_lengths[keep],
        )


def layout(model: nn.Module, pairs: list[TokenizedPair], pad_id: int,
           options: StepOptions) -> list[PairBatch]:
    """Batches whose sequences, concatenated, are chosen (B) then rejected (B)."""
    if options.prefix_sharing and options.packing and packing_is_exact(model, pairs):
        return [collate_packed(pairs)]
    if options.prefix_sharing and shared_prefix_is_exact(model, pairs):
        return [collate_shared_prefix(pairs, pad_id)]
    if options.concat_forward:
        return [collate_pairs(pairs, pad_id)]
    prompts = [p.prompt_ids for p in pairs]
    return [
        collate_sequences(prompts, [p.chosen_ids for p in pairs], pad_id),
        collate_sequences(prompts, [p.rejected_ids for p in pairs], pad_id),
    ]


def model_logps(model: nn.Module, batches: list[PairBatch], options: StepOptions) -> torch.Tensor:
    """Sequence log-probs of ``model`` over ``batches``, concatenated. Shape: (2B,)."""
    head_only = options.head_only and head_only_is_exact(model)
    device = next(model.parameters()).device
    wrapped = _routes.get(model)
    with autocast(device, options.autocast):
        if wrapped is None:
            return torch.cat([sequence_logps(model, b.to(device), head_only) for b in batches])
        return torch.cat([
            wrapped(b.input_ids, b.attention_mask, b.position_ids, b.predictors, b.targets,
                    b.sequences, b.num_sequences, head_only, b.segments)
            for b in (batch.to(device) for batch in batches)
        ])


def pair_forward(
    policy: nn.Module,
    reference: nn.Module | None,
    pairs: list[TokenizedPair],
    params: LossParams,
    pad_id: int,
    options: StepOptions = StepOptions(),
) -> PairForward:
    """Policy log-probs (with gradients if enabled), reference log-probs, then the loss."""
    b = len(pairs)
    batches = layout(policy, pairs, pad_id, options)
    policy_logps = model_logps(policy, batches, options)  # (2B,)
    ref_logps = None
    if all(p.reference_logps is not None for p in pairs):
        ref_logps = torch.tensor([p.reference_logps[0] for p in pairs]
                                 + [p.reference_logps[1] for p in pairs])
    elif reference is not None:
        # The layout is the reference's own: packing switches each model's attention itself.
        ref_batches = batches if reference is policy else layout(reference, pairs, pad_id, options)
        with torch.no_grad():
            ref_logps = model_logps(reference, ref_batches, options)
    lengths = torch.cat([batch.lengths() for batch in batches]).to(policy_logps.device)
    ref_chosen = ref_rejected = None
    if ref_logps is not None:
        ref_logps = ref_logps.to(policy_logps.device)
        ref_chosen, ref_rejected = ref_logps[:b], ref_logps[b:]
    loss = compute_loss(
        params, policy_logps[:b], policy_logps[b:], ref_chosen, ref_rejected,
        lengths[:b], lengths[b:],
    )
    return PairForward(
        loss, policy_logps[:b], policy_logps[b:], ref_chosen, ref_rejected,
        lengths[:b], lengths[b:], sum(p.num_tokens for p in pairs),
    )
