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


def sample_rewards(
    policy: nn.Module, reference: nn.Module, prompt_ids: list[tuple[int, ...]],
    responses: list[tuple[int, ...]], beta: float, pad_id: int,
) -> list[float]:
    """Implicit rewards beta * (log pi - log pi_ref) of generated responses.

    ``prompt_ids`` repeats cyclically when there are more responses than prompts (for
    example before-and-after generations of the same prompts).
    """
    from preftune.data.collate import collate_sequences
    from preftune.logps import sequence_logps

    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(len(responses))]
    # An empty generation still has a defined reward: score its end-of-sequence alone.
    responses = [r if r else (pad_id,) for r in responses]
    batch = collate_sequences(prompts, responses, pad_id)
    with torch.no_grad():
        policy_logps = sequence_logps(policy, batch.to(next(policy.parameters()).device))
        reference_logps = sequence_logps(reference, batch.to(next(reference.parameters()).device))
    return (beta * (policy_logps - reference_logps)).tolist()
