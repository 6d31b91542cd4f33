"""The model a run trains: loaded as configured, its frozen reference, and how it is saved.

- Loading: ``--model`` as resolved by :mod:`preftune.models`; with ``--lora``, a fresh
  adapter on it, or, when ``--model`` is an adapter folder, that adapter continued (see
  :mod:`preftune.lora`); ``--gradient-checkpointing``; then this process's device.
- The reference: a frozen copy of the policy as loaded, or, for a LoRA policy, the same
  model with its adapter off (no second copy of the base weights).
- Saving: ``RUN/model`` holds the full model, or the LoRA adapter (plus the merged model in
  ``RUN/model-merged`` with ``--merge``); process 0 writes, and under FSDP or ZeRO-3 every
  process first takes part in gathering the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from preftune import lora, models
from preftune.config import TrainConfig
from preftune.distributed import Engine

log = logging.getLogger(__name__)


def load_policy(cfg: TrainConfig, engine: Engine) -> tuple[nn.Module, object]:
    """``(policy, tokenizer)``: the model to train, on this process's device."""
    log.info("loading %s", cfg.model)
    if cfg.lora and models.resolve(cfg.model).kind == "adapter":
        policy, tokenizer = lora.load_adapter_for_training(cfg.model, cfg.dtype,
                                                           cfg.trust_remote_code)
    else:
        policy, tokenizer = models.load(cfg.model, dtype=cfg.dtype,
                                        trust_remote_code=cfg.trust_remote_code)
        if cfg.lora:
            policy = lora.add_adapter(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                      cfg.lora_target_modules_list())
    if cfg.dtype == "bfloat16" and not cfg.lora:
        # LoRA adapters stay float32 on a bfloat16 base; full fine-tuning updates bf16 weights.
        log.warning("--dtype bfloat16: weights and their updates are bfloat16, and an update "
                    "under ~0.4% of a weight rounds away (small --lr stalls); --autocast "
                    "trains float32 weights with bfloat16 arithmetic")
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)
    return engine.place(policy), tokenizer


def enable_checkpointing(policy: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (exact: dropout is off).

    The non-reentrant variant needs no input gradients, so it also works with LoRA, whose
    embeddings are frozen. transformers 5 renamed the method; older releases have the second.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(policy, "activation_checkpointing_enable"):
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def reference_for(policy: nn.Module, reload: TrainConfig | None = None) -> nn.Module:
    """The frozen reference for ``policy``.

    A LoRA policy's reference is a view of it with the adapter off. Otherwise it is a copy
    of ``policy``, which must still be as loaded, or, with ``reload``, that config's model
    loaded afresh (after training has changed the policy).
    """
    if lora.is_lora(policy):
        return lora.reference_of(policy)
    if reload is not None:
        policy = models.load(reload.model, dtype=reload.dtype,
                             trust_remote_code=reload.trust_remote_code)[0]
    return models.frozen_copy(policy)


def save_policy(cfg: TrainConfig, engine: Engine, policy: nn.Module, tokenizer,
                run_dir: Path) -> None:
    """Write ``RUN/model`` (and ``RUN/model-merged`` with ``--merge``) from process 0."""
    state = engine.full_state_dict(policy)  # under FSDP/ZeRO-3 every process takes part
    if not engine.is_main:
        return
    folder = run_dir / "model"
    if lora.is_lora(policy):
        lora.save_adapter(policy, folder, lora.base_spec(cfg.model))
    else:
        policy.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    if cfg.merge:
        lora.save_merged(policy, run_dir / "model-merged")
        tokenizer.save_pretrained(run_dir / "model-merged")


def trainable_parameters(policy: nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every weight, or the adapter's alone under LoRA."""
    return [p for p in policy.parameters() if p.requires_grad]
