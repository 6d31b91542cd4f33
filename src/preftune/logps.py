"""Sequence log-probs: the sum of response-token log-probs under a causal LM.

Position t of a causal LM predicts token t + 1, so a response token at position t is scored
by the hidden state at t - 1. Prompt and padding positions contribute nothing.

The default path runs the model body once, keeps the hidden states of the positions that
predict response tokens, and applies the vocabulary head and log-softmax to those alone, in
chunks: a (rows x length x vocab) logits tensor never exists. Models whose forward does more
than ``head(body(x))`` (logit soft-capping or scaling, for instance) would be scored wrongly
that way, so :func:`head_only_is_exact` checks each model once against its own full forward
and the full-logits path is used where they differ.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from preftune.data.collate import PairBatch

log = logging.getLogger(__name__)

HEAD_CHUNK_TOKENS = 1024
_exactness: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sequence_logps(model: nn.Module, batch: PairBatch, head_only: bool | None = None) -> torch.Tensor:
    """Sum of response-token log-probs for each row of ``batch``.

    Returns:
        Float32 tensor of shape (rows,), differentiable when grad is enabled.
    """
    if head_only is None:
        head_only = head_only_is_exact(model)
    fn = _logps_head_only if head_only else _logps_full_logits
    return fn(model, batch.input_ids, batch.attention_mask, batch.response_mask)


def head_only_is_exact(model: nn.Module) -> bool:
    """Whether ``head(body(x))`` reproduces the model's own logits (checked once per model)."""
    if model in _exactness:
        return _exactness[model]
    exact = False
    if _body_and_head(model) is not None:
        ids = torch.arange(3, 11, device=_device(model)).unsqueeze(0)  # (1, 8)
        mask = torch.ones_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[:, 2:] = True
        with torch.no_grad():
            fast = _logps_head_only(model, ids, mask, targets)
            full = _logps_full_logits(model, ids, mask, targets)
        exact = bool(torch.allclose(fast, full, rtol=1e-4, atol=1e-4))
        if not exact:
            log.warning("%s: the head-only fast path differs from the full forward; "
                        "using full logits", type(model).__name__)
    _exactness[model] = exact
    return exact


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        body, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if body is None or body is model or not isinstance(head, nn.Linear):
        return None
    return body, head


def _logps_head_only(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    body, head = _body_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # (N, T, H)
    target_mask = response_mask[:, 1:]  # (N, T-1): state t scores token t + 1
    states = hidden[:, :-1][target_mask]  # (M, H)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    token_logps = torch.cat(
        [
            _token_logps(head(chunk), chunk_targets)
            for chunk, chunk_targets in zip(
                states.split(HEAD_CHUNK_TOKENS), targets.split(HEAD_CHUNK_TOKENS)
            )
        ]
    ) if len(targets) else states.new_zeros(0, dtype=torch.float32)
    rows = target_mask.nonzero()[:, 0]  # (M,)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, token_logps)


def _logps_full_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target_mask = response_mask[:, 1:]  # (N, T-1)
    token_logps = _token_logps(logits[:, :-1][target_mask], input_ids[:, 1:][target_mask])
    rows = target_mask.nonzero()[:, 0]
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, token_logps)


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32 whatever the weights' dtype. Shape: (M,)."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")
