"""Batching tokenized pairs for one forward pass over chosen and rejected together.

A batch of B pairs becomes 2B rows: rows 0..B-1 are ``prompt + chosen`` and rows B..2B-1
are ``prompt + rejected``, right-padded to the longest row. ``response_mask`` marks the
response tokens, the only ones whose log-probs count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from preftune.data.tokenize import TokenizedPair


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T), 1 on real tokens
    response_mask: torch.Tensor  # (2B, T), 1 on response tokens
    num_pairs: int

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())

    def lengths(self) -> torch.Tensor:
        """Response token counts, shape (2B,)."""
        return self.response_mask.sum(dim=1)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> PairBatch:
    """Rows ``prompt + chosen`` for every pair, then ``prompt + rejected``."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id)
    batch.num_pairs = len(pairs)
    return batch


def collate_sequences(
    prompt_ids: list[tuple[int, ...]], response_ids: list[tuple[int, ...]], pad_id: int
) -> PairBatch:
    """Batch (prompt, response) sequences, right-padded; ``num_pairs`` is 0."""
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        response_mask[i, len(prompt) : len(row)] = True
    return PairBatch(input_ids, attention_mask, response_mask, 0)
