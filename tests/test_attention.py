"""The packed layout: several pairs in one row, attention computed pair by pair."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from preftune import attention, models
from preftune.attention import Segment, rejected_mask, segment_attention
from preftune.data.collate import collate_packed
from preftune.data.tokenize import TokenizedPair
from preftune.logps import sequence_logps

PAIRS = [
    TokenizedPair((3, 4, 5), (6, 7), (8, 9, 10), "t", 0, ""),
    TokenizedPair((11, 12), (13,), (14,), "t", 1, ""),
]


def test_collate_packed_lays_pairs_end_to_end():
    batch = collate_packed(PAIRS)
    assert batch.input_ids.tolist() == [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    # Rejected positions restart where the prompt ends, as in the separate row.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 2]]
    assert batch.attention_mask is None
    # Chosen tokens (pair 0, pair 1), then rejected tokens; each rejected response's first
    # token is predicted by its prompt's last position.
    assert batch.targets.tolist() == [6, 7, 13, 8, 9, 10, 14]
    assert batch.predictors.tolist() == [2, 3, 9, 2, 5, 6, 9]
    assert batch.sequences.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert [(s.start, s.prompt, s.chosen, s.rejected) for s in batch.segments] == [
        (0, 3, 2, 3), (8, 2, 1, 1)]
    assert batch.lengths().tolist() == [2, 1, 3, 1]


def test_rejected_mask_sees_prompt_and_earlier_rejected_tokens():
    assert rejected_mask(2, 3).int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


def _full_mask(segments, width):
    """The (T, T) mask the packed row means: each pair's prefix-shared mask on the diagonal."""
    mask = torch.zeros((width, width), dtype=torch.bool)
    for s in segments:
        n = s.prompt + s.chosen + s.rejected
        block = torch.ones((n, n), dtype=torch.bool).tril()
        block[s.prompt + s.chosen:, s.prompt:s.prompt + s.chosen] = False
        mask[s.start:s.start + n, s.start:s.start + n] = block
    return mask


def test_segment_attention_equals_one_masked_attention_with_grouped_heads():
    torch.manual_seed(0)
    segments = collate_packed(PAIRS).segments
    width, heads, kv_heads, dim = 12, 4, 2, 8
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads)
    q = torch.randn(1, heads, width, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, width, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, width, dim, dtype=torch.float64, requires_grad=True)
    out, _ = segment_attention(module, q, k, v, None, scaling=0.3,
                               preftune_segments=segments)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
        attn_mask=_full_mask(segments, width), scale=0.3,
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("feature", ["softcap", "sliding_window"])
def test_attention_features_it_does_not_implement_are_refused(feature):
    q = torch.randn(1, 2, 12, 4)
    segments = collate_packed(PAIRS).segments
    with pytest.raises(ValueError, match=feature):
        segment_attention(types.SimpleNamespace(), q, q, q, None,
                          preftune_segments=segments, **{feature: 8})


def test_packed_batch_on_a_model_without_packed_attention_is_refused(tiny_llama_folder):
    model, _ = models.load(str(tiny_llama_folder))
    assert not attention.is_enabled(model)  # loading does not switch it
    with pytest.raises(ValueError, match="packed batch"):
        sequence_logps(model, collate_packed(PAIRS))


def test_segments_move_with_the_batch():
    batch = collate_packed(PAIRS).to("meta")
    assert all(s.rejected_mask.device.type == "meta" for s in batch.segments)
    assert isinstance(batch.segments[0], Segment)


def test_an_additive_mask_is_refused():
    """Some models carry a learned bias in the mask (Doge); per-pair attention would drop it."""
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match="additive"):
        segment_attention(types.SimpleNamespace(), q, q, q, torch.zeros(1, 1, 12, 12),
                          preftune_segments=collate_packed(PAIRS).segments)
