"""Batching tokenized pairs into model inputs plus a plan of which log-probs to gather.

Three layouts give the same sequence log-probs:

- **stacked** (:func:`collate_pairs`): B pairs become 2B rows, ``prompt + chosen`` for each
  pair and then ``prompt + rejected``, right-padded to the longest row.
- **prefix-shared** (:func:`collate_shared_prefix`): each pair is one row
  ``[prompt][chosen][rejected]``. Position ids restart at the prompt's end for the rejected
  tokens, and a (B, 1, T, T) mask lets rejected tokens see the prompt but not the chosen
  ones, so the row computes exactly what the two stacked rows compute while the prompt is
  run once instead of twice.
- **packed** (:func:`collate_packed`): the prefix-shared rows of every pair laid end to end
  in one row, with no padding. It carries a :class:`~preftune.attention.Segment` per pair
  instead of a mask, and attention runs pair by pair (:mod:`preftune.attention`).

Either way the batch carries a gather plan: for each response token, the flat index of the
hidden state that predicts it (``predictors``), its id (``targets``) and the sequence it
belongs to (``sequences``: 0..B-1 chosen, B..2B-1 rejected). A response's first token is
predicted by the prompt's last position, also when the response is the rejected one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from preftune.attention import Segment, rejected_mask

if TYPE_CHECKING:
    from preftune.data.tokenize import TokenizedPair


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (N, T)
    # (N, T) 1 on real tokens, (N, 1, T, T) bool for shared prefix, None when packed
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None  # (N, T), None for the model's default positions
    predictors: torch.Tensor  # (M,) flat index into N * T of the state predicting each target
    targets: torch.Tensor  # (M,) token ids of every response token
    sequences: torch.Tensor  # (M,) which scored sequence each target belongs to
    num_sequences: int  # 2B for pairs (chosen then rejected), or the number of sequences
    num_pairs: int  # B, or 0 for single sequences
    num_tokens: int  # real tokens as a model reading each sequence whole would see them
    segments: tuple[Segment, ...] | None = None  # packed layout: each pair's span of the row

    def to(self, device: torch.device | str) -> PairBatch:
        """Move every tensor to ``device`` (in place); returns the batch."""
        for name in ("input_ids", "attention_mask", "position_ids", "predictors", "targets",
                     "sequences"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.segments is not None:
            self.segments = tuple(segment.to(device) for segment in self.segments)
        return self

    def lengths(self) -> torch.Tensor:
        """Response token counts per scored sequence. Shape: (num_sequences,)."""
        return torch.bincount(self.sequences, minlength=self.num_sequences)


def collate_sequences(
    prompt_ids: list[tuple[int, ...]], response_ids: list[tuple[int, ...]], pad_id: int
) -> PairBatch:
    """One right-padded row per (prompt, response); sequence i is row i."""
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predictors, sequences = [], []
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        positions = range(len(prompt) - 1, len(row) - 1)  # the state before each response token
        predictors.extend(i * width + t for t in positions)
        sequences.extend([i] * len(positions))
    flat = input_ids.flatten()
    predictors_t = torch.tensor(predictors, dtype=torch.long)
    return PairBatch(
        input_ids, attention_mask, None, predictors_t, flat[predictors_t + 1],
        torch.tensor(sequences, dtype=torch.long), len(rows), 0, sum(len(r) for r in rows),
    )


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> PairBatch:
    """Stacked layout: rows ``prompt + chosen`` for every pair, then ``prompt + rejected``."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id)
    batch.num_pairs = len(pairs)
    return batch


def collate_shared_prefix(pairs: list[TokenizedPair], pad_id: int) -> PairBatch:
    """Prefix-shared layout: one row ``[prompt][chosen][rejected]`` per pair."""
    b = len(pairs)
    width = max(_row_length(p) for p in pairs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    # Padding queries attend to themselves only, so no row of the mask is empty (an empty
    # row would make attention's softmax NaN); their outputs are never gathered.
    allowed = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1)  # (B, T, T)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for i, pair in enumerate(pairs):
        p, c, n = len(pair.prompt_ids), len(pair.chosen_ids), _row_length(pair)
        input_ids[i, :n] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
        position_ids[i, :n] = torch.tensor(_positions(pair))
        allowed[i, :n, :n] = causal[:n, :n]
        allowed[i, p + c : n, p : p + c] = False  # rejected tokens never see the chosen ones
    predictors, targets, sequences = _gather_plan(pairs, [i * width for i in range(b)],
                                                  input_ids.flatten())
    return PairBatch(
        input_ids, allowed.unsqueeze(1), position_ids, predictors, targets, sequences, 2 * b,
        b, sum(p.num_tokens for p in pairs),
    )


def collate_packed(pairs: list[TokenizedPair]) -> PairBatch:
    """Packed layout: ``[prompt][chosen][rejected]`` of every pair in one row, no padding.

    Positions and the gather plan are those of :func:`collate_shared_prefix`, offset by
    where each pair starts in the row.
    """
    ids: list[int] = []
    positions: list[int] = []
    starts = []
    segments = []
    for pair in pairs:
        starts.append(len(ids))
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        ids += [*pair.prompt_ids, *pair.chosen_ids, *pair.rejected_ids]
        positions += _positions(pair)
        segments.append(Segment(starts[-1], p, c, r, rejected_mask(p, r)))
    input_ids = torch.tensor([ids], dtype=torch.long)
    predictors, targets, sequences = _gather_plan(pairs, starts, input_ids[0])
    return PairBatch(
        input_ids, None, torch.tensor([positions], dtype=torch.long), predictors, targets,
        sequences, 2 * len(pairs), len(pairs), sum(p.num_tokens for p in pairs),
        tuple(segments),
    )


def _row_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def _positions(pair: TokenizedPair) -> list[int]:
    """Position ids of ``[prompt][chosen][rejected]``: rejected restarts where the prompt ends."""
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    return [*range(p + c), *range(p, p + r)]


def _gather_plan(pairs: list[TokenizedPair], starts: list[int], flat_ids: torch.Tensor):
    """Predictors, targets and sequences of ``[prompt][chosen][rejected]`` rows whose pair i
    starts at flat index ``starts[i]``: chosen tokens of every pair, then rejected tokens.

    Chosen token k (row position p + k) is predicted by position p + k - 1; rejected token k
    (row position p + c + k) by p - 1 for k = 0, else by p + c + k - 1.
    """
    b = len(pairs)
    predictors: dict[int, list[int]] = {0: [], 1: []}  # chosen, rejected
    target_positions: dict[int, list[int]] = {0: [], 1: []}
    sequences: dict[int, list[int]] = {0: [], 1: []}
    for i, (pair, a) in enumerate(zip(pairs, starts)):
        p, c, n = len(pair.prompt_ids), len(pair.chosen_ids), _row_length(pair)
        predictors[0] += range(a + p - 1, a + p + c - 1)
        predictors[1] += [a + p - 1, *range(a + p + c, a + n - 1)]
        target_positions[0] += (a + t for t in _span(pair, "chosen"))
        target_positions[1] += (a + t for t in _span(pair, "rejected"))
        sequences[0] += [i] * c
        sequences[1] += [b + i] * (n - p - c)
    targets = flat_ids[torch.tensor(target_positions[0] + target_positions[1], dtype=torch.long)]
    return (torch.tensor(predictors[0] + predictors[1], dtype=torch.long), targets,
            torch.tensor(sequences[0] + sequences[1], dtype=torch.long))


def _span(pair: TokenizedPair, which: str) -> range:
    p, c = len(pair.prompt_ids), len(pair.chosen_ids)
    if which == "chosen":
        return range(p, p + c)
    return range(p + c, p + c + len(pair.rejected_ids))
