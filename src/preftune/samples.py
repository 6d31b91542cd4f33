"""Greedy generations from the same prompts before and after training."""

from __future__ import annotations

import torch
from torch import nn


def generate(
    model: nn.Module, tokenizer, prompt_ids: tuple[int, ...], max_new_tokens: int,
    do_sample: bool = False, seed: int = 0,
) -> tuple[int, ...]:
    """Token ids the model generates after ``prompt_ids`` (greedy unless ``do_sample``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = {"do_sample": False}
    if do_sample:
        torch.manual_seed(seed)
        kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    else:
        kwargs.update({"temperature": None, "top_p": None, "top_k": None})
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    model.train(was_training)
    return tuple(out[0, len(prompt_ids) :].tolist())
