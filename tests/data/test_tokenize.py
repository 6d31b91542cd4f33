"""Exact tokens at the prompt/response boundary, BOS/EOS counts and truncation."""

from __future__ import annotations

import pytest

from preftune.data.formats import PreferencePair
from preftune.data.report import DataError, DataReport
from preftune.data.tokenize import PairTokenizer, tokenize_pairs


def _chat_pair(prompt: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(
        ({"role": "user", "content": prompt},),
        ({"role": "assistant", "content": chosen},),
        ({"role": "assistant", "content": rejected},),
        "mem.jsonl",
        1,
    )


def test_smollm_chat_template_boundary_tokens(smollm_tokenizer):
    """The prompt ends with the assistant header; each response ends with one <|im_end|>."""
    tok = smollm_tokenizer
    pair = _chat_pair("Hi there", "Hello!", "Go away.")
    tokenized, cut = PairTokenizer(tok, 128)(pair)
    prompt = tok.convert_ids_to_tokens(tokenized.prompt_ids)
    assert cut == 0
    assert prompt[0] == "<|im_start|>"  # the template's own first token; nothing added before
    assert prompt[-5:] == ["Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    assert tok.convert_ids_to_tokens(tokenized.chosen_ids) == ["Hello", "!", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(tokenized.rejected_ids) == ["Go", "Ġaway", ".", "<|im_end|>"]
    for ids in (tokenized.chosen_ids, tokenized.rejected_ids):
        assert list(ids).count(tok.convert_tokens_to_ids("<|im_end|>")) == 1


def test_smollm_plain_text_gets_one_eos_and_no_bos(smollm_tokenizer):
    """SmolLM2's tokenizer adds no BOS to plain text; each response is closed by EOS once."""
    tok = smollm_tokenizer
    pair = PreferencePair("\n\nHuman: hi\n\nAssistant:", " Hello there", " No", "x", 2)
    tokenized, _ = PairTokenizer(tok, 128)(pair)
    assert tok.convert_ids_to_tokens(tokenized.prompt_ids) == [
        "Ċ", "Ċ", "Human", ":", "Ġhi", "Ċ", "Ċ", "Ass", "istant", ":"
    ]
    assert tok.convert_ids_to_tokens(tokenized.chosen_ids) == ["ĠHello", "Ġthere", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(tokenized.rejected_ids) == ["ĠNo", "<|im_end|>"]


def test_response_already_ending_in_eos_gets_no_second(smollm_tokenizer):
    pair = PreferencePair("Q:", " A<|im_end|>", " B", "x", 3)
    tokenized, _ = PairTokenizer(smollm_tokenizer, 64)(pair)
    assert smollm_tokenizer.convert_ids_to_tokens(tokenized.chosen_ids) == ["ĠA", "<|im_end|>"]


def test_bos_tokenizer_gets_exactly_one_bos(bos_tokenizer):
    """A tokenizer that adds <s> gets it once, at the prompt start, never before responses."""
    pair = PreferencePair("Human: How do I boil an egg?", " Put it in water.", " No.", "x", 1)
    tokenized, _ = PairTokenizer(bos_tokenizer, 64)(pair)
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    full_chosen = tokenized.prompt_ids + tokenized.chosen_ids
    assert full_chosen[0] == bos and full_chosen.count(bos) == 1
    assert tokenized.chosen_ids[-1] == eos and tokenized.chosen_ids.count(eos) == 1
    assert bos not in tokenized.chosen_ids and bos not in tokenized.rejected_ids


def test_chosen_and_rejected_share_identical_prompt_tokens(smollm_tokenizer):
    tokenized, _ = PairTokenizer(smollm_tokenizer, 128)(_chat_pair("Name a colour.", "Red", "Blue"))
    chosen_row = tokenized.prompt_ids + tokenized.chosen_ids
    rejected_row = tokenized.prompt_ids + tokenized.rejected_ids
    n = len(tokenized.prompt_ids)
    assert chosen_row[:n] == rejected_row[:n]


def test_truncation_cuts_prompt_from_left_and_keeps_bos(bos_tokenizer):
    """Both responses survive whole; the prompt loses its oldest tokens, BOS stays first."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    pair = PreferencePair(prompt, " Chosen answers are short.", " No.", "x", 1)
    full, _ = PairTokenizer(bos_tokenizer, 512)(pair)
    short, cut = PairTokenizer(bos_tokenizer, 20)(pair)
    assert cut > 0
    assert short.chosen_ids == full.chosen_ids and short.rejected_ids == full.rejected_ids
    assert short.prompt_ids[0] == bos_tokenizer.bos_token_id
    assert short.prompt_ids[1:] == full.prompt_ids[-(len(short.prompt_ids) - 1):]
    longest = max(len(short.chosen_ids), len(short.rejected_ids))
    assert len(short.prompt_ids) + longest == 20


def test_pair_whose_response_cannot_fit_is_dropped_and_reported(bos_tokenizer):
    pair = PreferencePair("Q", " The quick brown fox jumps over the lazy dog.", " No.", "d.jsonl", 7)
    report = DataReport()
    kept = tokenize_pairs([pair], PairTokenizer(bos_tokenizer, 8), report)
    assert kept == []
    assert report.entries[0].record == 7
    assert "too long" in report.entries[0].reason
    with pytest.raises(DataError, match=r"d\.jsonl:7: too long"):
        tokenize_pairs([pair], PairTokenizer(bos_tokenizer, 8), DataReport(), "error")


def test_truncated_pair_is_reported_as_altered(bos_tokenizer):
    pair = PreferencePair("The quick brown fox jumps over the lazy dog. " * 3, " Yes.", " No.",
                          "d.jsonl", 3)
    report = DataReport()
    kept = tokenize_pairs([pair], PairTokenizer(bos_tokenizer, 12), report)
    assert len(kept) == 1
    assert [(e.record, e.action) for e in report.entries] == [(3, "altered")]
