"""Attention over packed pairs: several pairs in one row, with no padding and no (T x T) mask.

In the packed layout (:func:`preftune.data.collate.collate_packed`) a micro-batch is a
single row ``[prompt 1][chosen 1][rejected 1][prompt 2]...``. Every linear layer then runs
on real tokens only, where the padded layouts run on ``rows x longest row``; on the HH
benchmark a third to a half of those positions were padding.

Attention is computed pair by pair, in two calls of ``scaled_dot_product_attention``:

- ``[prompt][chosen]`` over itself, causal;
- ``[rejected]`` over ``[prompt][rejected]``, causal aligned to the bottom right, so each
  rejected token sees the whole prompt and the rejected tokens before it, never the chosen
  ones (the mask is (R, P + R), built once per batch).

That is exactly the attention of the separate rows ``prompt + chosen`` and ``prompt +
rejected``, so sequence log-probs are unchanged (tests hold them to the naive path).

The function is registered with transformers as ``preftune_sdpa``: without segments it is
transformers' own SDPA attention, so generation and plain forward passes are untouched.
:func:`enable_packing` switches a model from ``sdpa`` to it; the self-check in
:func:`preftune.logps.packing_is_exact` then compares packed and stacked log-probs once
and switches back if they differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

NAME = "preftune_sdpa"
SEGMENTS_KWARG = "preftune_segments"
# Attention features the per-pair calls do not implement: a model passing any of them keeps
# the padded layouts (the self-check sees the error and falls back).
_UNSUPPORTED = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")


@dataclass(frozen=True)
class Segment:
    """One pair's span of a packed row: ``[prompt][chosen][rejected]`` from ``start``."""

    start: int
    prompt: int
    chosen: int
    rejected: int
    rejected_mask: torch.Tensor  # (rejected, prompt + rejected) bool: True where attended

    def to(self, device: torch.device | str) -> Segment:
        return Segment(self.start, self.prompt, self.chosen, self.rejected,
                       self.rejected_mask.to(device))


def rejected_mask(prompt: int, rejected: int) -> torch.Tensor:
    """(R, P + R) bool: rejected token j sees the P prompt tokens and rejected tokens <= j."""
    mask = torch.ones((rejected, prompt + rejected), dtype=torch.bool)
    mask[:, prompt:] = torch.ones((rejected, rejected), dtype=torch.bool).tril()
    return mask


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for a transformers layer: per pair over a packed row, else plain SDPA.

    Shapes: query (1, H, T, D), key and value (1, H_kv, T, D) -> output (1, T, H, D).
    """
    segments: tuple[Segment, ...] | None = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               dropout=dropout, scaling=scaling, **kwargs)
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"packed attention does not implement {', '.join(unsupported)}")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]}")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        # Some models add a learned bias to the scores through the mask (Doge); per-pair
        # masks would drop it, and with it its gradient.
        raise ValueError("packed attention cannot apply an additive attention mask")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        # Grouped-query attention: each key/value head serves `groups` query heads.
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # TODO: time this on a GPU: two small calls per pair and layer suit a CPU, and a GPU may
    # prefer one varlen kernel call for the whole row.
    sdpa = F.scaled_dot_product_attention
    outputs = []
    for seg in segments:
        a = seg.start
        prompt_end = a + seg.prompt
        chosen_end = prompt_end + seg.chosen
        end = chosen_end + seg.rejected
        span = slice(a, chosen_end)
        outputs.append(sdpa(query[:, :, span], key[:, :, span], value[:, :, span],
                            dropout_p=dropout, is_causal=True, scale=scaling))
        if seg.rejected:
            keys = torch.cat([key[:, :, a:prompt_end], key[:, :, chosen_end:end]], dim=2)
            values = torch.cat([value[:, :, a:prompt_end], value[:, :, chosen_end:end]], dim=2)
            outputs.append(sdpa(query[:, :, chosen_end:end], keys, values,
                                attn_mask=seg.rejected_mask, dropout_p=dropout, scale=scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Register :func:`segment_attention` with transformers; False where it cannot be."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    AttentionInterface.register(NAME, segment_attention)
    # Unpacked calls build transformers' SDPA mask; packed calls pass none and ignore it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


_REGISTERED = _register()


def enable_packing(model: nn.Module) -> bool:
    """Switch ``model`` from transformers' SDPA attention to :func:`segment_attention`.

    Only a model on ``sdpa`` is switched (eager attention may be deliberate, and other
    kernels are not SDPA); returns whether the model now runs ``preftune_sdpa``.
    """
    if is_enabled(model):
        return True
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not _REGISTERED or current != "sdpa":
        return False
    _set_implementation(model, NAME)
    return True


def is_enabled(model: nn.Module) -> bool:
    """Whether ``model`` runs :func:`segment_attention` (so it can read a packed batch)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def disable_packing(model: nn.Module) -> None:
    """Back to transformers' SDPA attention (after a failed self-check)."""
    if is_enabled(model):
        _set_implementation(model, "sdpa")


def _set_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:
        model.config._attn_implementation = name
