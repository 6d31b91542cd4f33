"""Sequence log-probs: the sum of response-token log-probs under a causal LM.

Position t of a causal LM predicts token t + 1, so a response token is scored by the hidden
state just before it (see the gather plan in :mod:`preftune.data.collate`). Prompt and
padding positions contribute nothing.

The default path runs the model body once, gathers the hidden states that predict response
tokens, and applies the vocabulary head and log-softmax to those alone, in chunks, through
:class:`ChunkedHeadLogps`: a (rows x length x vocab) logits tensor never exists, and the
backward pass recomputes each chunk's logits instead of keeping them, so memory does not
grow with the vocabulary. Models whose forward does more than ``head(body(x))`` (logit
soft-capping or scaling, for instance) would be scored wrongly that way, so
:func:`head_only_is_exact` checks each model once against its own full forward and the
full-logits path is used where they differ.

Whatever the weights are (float32, bfloat16, or float32 under bfloat16 autocast), logits are
upcast to float32 before the log-softmax, so sequence log-probs, and the loss computed from
them, are float32 sums. Under autocast the head's matrix product runs in the autocast dtype
in both passes of :class:`ChunkedHeadLogps`, as autocast would run ``F.linear``.

A packed batch (several pairs in one row, :mod:`preftune.attention`) passes its segments to
the model's attention as a keyword argument; a model not switched to preftune's attention
refuses it rather than reading the row as one sequence.

:class:`SequenceLogps` puts :func:`sequence_logps` in a module's ``forward``, so that a
distributed engine (DDP, FSDP, DeepSpeed) that wraps the module sees each forward pass.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from preftune import attention

if TYPE_CHECKING:
    from preftune.data.collate import PairBatch

log = logging.getLogger(__name__)

HEAD_CHUNK_TOKENS = 1024
_exactness: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_prefix_exactness: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_packing_exactness: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sequence_logps(
    model: nn.Module, batch: PairBatch, head_only: bool | None = None
) -> torch.Tensor:
    """Sum of response-token log-probs for each sequence of ``batch``.

    Returns:
        Float32 tensor of shape (batch.num_sequences,), differentiable when grad is enabled.
    """
    if head_only is None:
        head_only = head_only_is_exact(model)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "use_cache": False}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if batch.segments is not None:
        # A model on another attention would read the packed row as one long sequence.
        if not attention.is_enabled(model):
            raise ValueError(f"{type(model).__name__} was given a packed batch, but its "
                             "attention is not preftune's packed attention")
        inputs[attention.SEGMENTS_KWARG] = batch.segments
    if head_only:
        body, head = _body_and_head(model)
        hidden = body(**inputs)[0]  # (N, T, H)
        states = hidden.flatten(0, 1)[batch.predictors]  # (M, H)
        token_logps = ChunkedHeadLogps.apply(states, head.weight, head.bias, batch.targets)
    else:
        # The obvious way: log-softmax over every position and the whole vocabulary.
        logits = model(**inputs).logits  # (N, T, V)
        logprobs = logits.float().log_softmax(-1).flatten(0, 1)  # (N * T, V)
        token_logps = logprobs[batch.predictors, batch.targets]  # (M,)
    out = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, batch.sequences, token_logps)


class ChunkedHeadLogps(torch.autograd.Function):
    """log softmax(states @ W.T + b)[target], chunk by chunk, logits recomputed in backward.

    Shapes: states (M, H), weight (V, H), bias (V,) or None, targets (M,) -> (M,) float32.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets):
        dtype = _softmax_dtype(states)
        out = torch.empty(states.shape[0], dtype=dtype, device=states.device)
        for start in range(0, states.shape[0], HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            logits = F.linear(states[rows], weight, bias).to(dtype)  # (chunk, V)
            out[rows] = -F.cross_entropy(logits, targets[rows], reduction="none")
        ctx.save_for_backward(states, weight, bias, targets)
        # The dtype the head's product ran in: the autocast dtype under autocast. The backward
        # pass runs outside autocast, so it casts to this dtype itself.
        device = states.device.type
        ctx.compute_dtype = (torch.get_autocast_dtype(device)
                             if torch.is_autocast_enabled(device) else states.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        states, weight, bias, targets = ctx.saved_tensors
        compute = ctx.compute_dtype
        grad_states = torch.empty_like(states) if ctx.needs_input_grad[0] else None
        # The weight's gradient is written by the first chunk and accumulated by the others:
        # zero-filling a (V, H) buffer first costs as much as a chunk's product on CPU.
        grad_weight = None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        w = weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        for start in range(0, states.shape[0], HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            x = states[rows].to(compute)  # (chunk, H)
            logits = F.linear(x, w, b).to(_softmax_dtype(states))  # (chunk, V)
            # d/dlogits of log softmax(logits)[target] is onehot(target) - softmax(logits).
            grad_logits = logits.softmax(-1).neg_()
            grad_logits[torch.arange(len(grad_logits)), targets[rows]] += 1
            grad_logits.mul_(grad_out[rows, None])
            grad_logits = grad_logits.to(compute)
            if grad_states is not None:
                grad_states[rows] = grad_logits @ w
            if ctx.needs_input_grad[1]:
                # float32 weights under autocast: the product is cast to the weight's dtype.
                if grad_weight is None:
                    grad_weight = (grad_logits.T @ x).to(weight.dtype)
                elif grad_weight.dtype == compute:
                    grad_weight.addmm_(grad_logits.T, x)
                else:
                    grad_weight.add_((grad_logits.T @ x).to(grad_weight.dtype))
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0).to(grad_bias.dtype))
        return grad_states, grad_weight, grad_bias, None


class SequenceLogps(nn.Module):
    """:func:`sequence_logps` of ``model`` as a forward pass, for an engine to wrap.

    DDP synchronises gradients, and FSDP or ZeRO-3 gather sharded weights, around the
    forward of the module they wrap; the head-only path calls the model's body and head
    separately, so the module they wrap is this one, whose forward is the whole scoring.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # FSDP's automatic wrapping reads the layer classes to shard by from here.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None, predictors: torch.Tensor,
                targets: torch.Tensor, sequences: torch.Tensor, num_sequences: int,
                head_only: bool, segments: tuple | None = None) -> torch.Tensor:
        from preftune.data.collate import PairBatch

        batch = PairBatch(input_ids, attention_mask, position_ids, predictors, targets,
                          sequences, num_sequences, 0, 0, segments)
        return sequence_logps(self.model, batch, head_only)  # (num_sequences,)


def _softmax_dtype(states: torch.Tensor) -> torch.dtype:
    """Float32 at least, whatever the weights are (float64 stays float64)."""
    return torch.float64 if states.dtype == torch.float64 else torch.float32


# Config fields of models whose logits are more than head(body(x)): soft-capped (Gemma 2),
# scaled (Cohere, Granite). A check on random weights can miss them, whose logits are tiny.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale",
                     "logits_scaling")


def head_only_is_exact(model: nn.Module) -> bool:
    """Whether ``head(body(x))`` reproduces the model's own logits (checked once per model)."""
    if model in _exactness:
        return _exactness[model]
    exact = False
    config = getattr(model, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS
                  if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        log.info("%s: logits pass through %s; using full logits", type(model).__name__,
                 ", ".join(transforms))
    elif _body_and_head(model) is not None:
        from preftune.data.collate import collate_sequences

        batch = collate_sequences([(3, 4, 5)], [(6, 7, 8, 9, 10)], pad_id=0)
        batch.to(next(model.parameters()).device)
        with torch.no_grad():
            fast = sequence_logps(model, batch, head_only=True)
            full = sequence_logps(model, batch, head_only=False)
        exact = bool(torch.allclose(fast, full, rtol=1e-4, atol=1e-4))
        if not exact:
            log.warning("%s: scoring response positions alone differs from the model's own "
                        "forward; using full logits", type(model).__name__)
    _exactness[model] = exact
    return exact


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
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


def shared_prefix_is_exact(model: nn.Module, pairs: list | None = None) -> bool:
    """Whether the model honours the prefix-shared layout's mask and positions (checked once).

    Architectures that ignore a 4D attention mask or custom position ids would silently mix
    the chosen response into the rejected one's context; they use the stacked layout. So do
    models whose attention depends on distance (a sliding window, chunks): a custom mask
    replaces the window, which a short self-check cannot see. ``pairs``, the first real
    pairs the model is given, join the self-check (see :func:`_layout_is_exact`).
    """
    from preftune.data.collate import collate_shared_prefix

    if model not in _prefix_exactness:
        _prefix_exactness[model] = _layout_is_exact(
            model, lambda batch: collate_shared_prefix(batch, 0), "prefix-shared", pairs)
    return _prefix_exactness[model]


def packing_is_exact(model: nn.Module, pairs: list | None = None) -> bool:
    """Whether packed pairs (:mod:`preftune.attention`) score as separate rows (checked once).

    Switches a model on transformers' SDPA attention to the packed-aware function and
    compares; a model that fails keeps (or gets back) its own attention.
    """
    from preftune.data.collate import collate_packed

    if model not in _packing_exactness:
        enabled = attention.enable_packing(model)
        if not enabled:
            log.info("%s: attention is %r, not sdpa: no packing", type(model).__name__,
                     getattr(getattr(model, "config", None), "_attn_implementation", None))
        exact = enabled and _layout_is_exact(model, collate_packed, "packed", pairs)
        if not exact:
            attention.disable_packing(model)
        _packing_exactness[model] = exact
    return _packing_exactness[model]


# The self-check's own pairs: one with a 20-token prompt and responses of 9 and 25 tokens,
# one with a single-token chosen response.
_CHECK_IDS = [(7 * i) % 89 + 3 for i in range(60)]
CHECK_PAIRS = (
    (tuple(_CHECK_IDS[:20]), tuple(_CHECK_IDS[20:29]), tuple(_CHECK_IDS[29:54])),
    ((13, 14), (15,), (16, 17, 18)),
)
_CHECK_REAL_PAIRS = 2  # real pairs added to the self-check, from the first batch


def distance_dependent_attention(model: nn.Module) -> str | None:
    """What makes the model's attention depend on distance (sliding window, chunks), if any."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    other = sorted({str(t) for t in getattr(config, "layer_types", None) or ()
                    if t != "full_attention"})
    if other:
        return f"layer types {', '.join(other)}"
    if getattr(config, "use_sliding_window", None) is False:
        return None
    # A window is honoured by some models whatever their layer types say (Mistral).
    for name in ("sliding_window", "attention_chunk_size", "sliding_window_size"):
        value = getattr(config, name, None)
        if value:
            return f"{name}={value}"
    return None


def _layout_is_exact(model: nn.Module, collate, name: str, pairs: list | None = None) -> bool:
    """Log-probs in ``collate``'s layout equal the stacked layout's, on the self-check pairs
    and the first real ones (whose lengths a model with length-dependent attention needs).

    The tolerance is 2e-5 relative (plus 1e-4 absolute) for float32 weights, where layouts
    differ by about 1e-6 in summation order alone, and 2e-2 for half-precision ones, whose
    rounding alone differs between layouts by more than that.
    """
    from preftune.data.collate import collate_pairs
    from preftune.data.tokenize import TokenizedPair

    reason = distance_dependent_attention(model)
    if reason is not None:
        log.info("%s: no %s layout (attention with %s)", type(model).__name__, name, reason)
        return False
    check = [TokenizedPair(p, c, r, "self-check", i, "") for i, (p, c, r) in
             enumerate(CHECK_PAIRS)] + list(pairs or [])[:_CHECK_REAL_PAIRS]
    weight = next(model.parameters())
    rtol, atol = (2e-5, 1e-4) if weight.dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)
    try:
        with torch.no_grad():
            fast = sequence_logps(model, collate(check).to(weight.device))
            stacked = sequence_logps(model, collate_pairs(check, 0).to(weight.device))
        exact = bool(torch.allclose(fast, stacked, rtol=rtol, atol=atol))
    except (RuntimeError, ValueError, TypeError) as err:
        log.info("%s: no %s layout (%s)", type(model).__name__, name, err)
        return False
    if not exact:
        log.warning("%s: the %s layout differs from separate sequences; using another layout",
                    type(model).__name__, name)
    return exact
