"""Sequence log-probs: only response tokens count, and batching or padding changes nothing."""

from __future__ import annotations

import pytest
import torch

from preftune import models
from preftune.data.collate import collate_pairs
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import PairTokenizer
from preftune.logps import head_only_is_exact, sequence_logps


def _pairs(tokenizer, texts):
    pt = PairTokenizer(tokenizer, 256)
    return [pt(PreferencePair(p, c, r, "mem", i))[0] for i, (p, c, r) in enumerate(texts)]


TEXTS = [
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water.", " No."),
    ("Q: colour?", " Red", " The quick brown fox jumps over the lazy dog, twice over."),
    ("A long prompt about a preference pair that has two responses. " * 3, " Yes", " No"),
]


def _manual_logps(model, prompt_ids, response_ids) -> float:
    """log p(response | prompt) from the model's own full logits, one token at a time."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = logits.log_softmax(-1)
    total = 0.0
    for k, token in enumerate(response_ids):
        position = len(prompt_ids) + k
        total += float(logprobs[position - 1, token])
    return total


@pytest.mark.parametrize("which", ["tiny_llama_folder", "gpt2_folder"])
def test_logps_equal_manual_sum_over_response_tokens(which, request):
    """Prompt tokens never count: the result is the sum of response-token log-probs only."""
    model, tok = models.load(str(request.getfixturevalue(which)))
    pairs = _pairs(tok, TEXTS)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        logps = sequence_logps(model, batch)
    b = len(pairs)
    for i, p in enumerate(pairs):
        expected_c = _manual_logps(model, list(p.prompt_ids), list(p.chosen_ids))
        expected_r = _manual_logps(model, list(p.prompt_ids), list(p.rejected_ids))
        assert logps[i].item() == pytest.approx(expected_c, rel=1e-5, abs=1e-4)
        assert logps[b + i].item() == pytest.approx(expected_r, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("which", ["tiny_llama_folder", "gpt2_folder"])
def test_pair_logps_same_alone_and_inside_padded_batch(which, request):
    model, tok = models.load(str(request.getfixturevalue(which)))
    pairs = _pairs(tok, TEXTS)
    with torch.no_grad():
        together = sequence_logps(model, collate_pairs(pairs, tok.pad_token_id))
        for i, p in enumerate(pairs):
            alone = sequence_logps(model, collate_pairs([p], tok.pad_token_id))
            torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone[1], together[len(pairs) + i], rtol=1e-5, atol=1e-5)


def test_padding_token_value_changes_nothing(tiny_llama):
    model, tok = tiny_llama
    pairs = _pairs(tok, TEXTS)
    with torch.no_grad():
        a = sequence_logps(model, collate_pairs(pairs, pad_id=tok.pad_token_id))
        b = sequence_logps(model, collate_pairs(pairs, pad_id=17))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_head_only_path_matches_full_logits(tiny_llama):
    model, tok = tiny_llama
    batch = collate_pairs(_pairs(tok, TEXTS), tok.pad_token_id)
    assert head_only_is_exact(model)
    with torch.no_grad():
        fast = sequence_logps(model, batch, head_only=True)
        full = sequence_logps(model, batch, head_only=False)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_soft_capped_model_falls_back_to_full_logits(tiny_llama):
    """A forward that rescales logits after the head must not be scored head-only."""
    model, tok = tiny_llama
    original = type(model).forward

    class Scaled(type(model)):
        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model.__class__ = Scaled
    assert not head_only_is_exact(model)
    (pair,) = _pairs(tok, TEXTS[:1])
    with torch.no_grad():
        logps = sequence_logps(model, collate_pairs([pair], tok.pad_token_id))
    # _manual_logps reads the subclass's own (halved) logits.
    expected = [_manual_logps(model, list(pair.prompt_ids), list(ids))
                for ids in (pair.chosen_ids, pair.rejected_ids)]
    assert logps.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-4)
