"""Every speed option gives the naive path's log-probs, loss and gradients.

The naive path is the obvious implementation: chosen and rejected in separate model calls,
log-softmax over every position and the whole vocabulary, a reference pass every step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from preftune import attention, logps, models, reference
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import PairTokenizer, TokenizedPair
from preftune.forward import StepOptions, layout, model_logps, pair_forward
from preftune.logps import (
    ChunkedHeadLogps,
    distance_dependent_attention,
    head_only_is_exact,
    packing_is_exact,
    shared_prefix_is_exact,
)
from preftune.losses import LossParams

NAIVE = StepOptions(concat_forward=False, head_only=False, prefix_sharing=False, packing=False)
VARIANTS = {
    "concat": StepOptions(concat_forward=True, head_only=False, prefix_sharing=False,
                          packing=False),
    "head_only": StepOptions(concat_forward=False, head_only=True, prefix_sharing=False,
                             packing=False),
    "prefix_sharing": StepOptions(concat_forward=False, head_only=False, prefix_sharing=True,
                                  packing=False),
    "packing": StepOptions(concat_forward=False, head_only=False, prefix_sharing=True,
                           packing=True),
    "all": StepOptions(),
}

# Chosen and rejected of different lengths, a single-token response, a long prompt that
# max_length cuts from the left.
TEXTS = [
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Boil it for nine minutes.", " No."),
    ("Q: colour?", " Red", " The quick brown fox jumps over the lazy dog, twice."),
    ("Q: yes or no?", "", " No"),
    ("A very long prompt about preference pairs and their two responses. " * 6, " Yes", " No"),
]


def _pairs(tokenizer, max_length=48):
    pt = PairTokenizer(tokenizer, max_length)
    pairs = [pt(PreferencePair(p, c, r, "mem", i))[0] for i, (p, c, r) in enumerate(TEXTS)]
    assert len(pairs[2].chosen_ids) == 1  # the empty text became EOS alone: one token
    return pairs


@pytest.fixture(params=["tiny_llama_folder", "gpt2_folder"])
def model_and_pairs(request):
    model, tok = models.load(str(request.getfixturevalue(request.param)))
    pairs = _pairs(tok)
    assert PairTokenizer(tok, 48)(PreferencePair(*TEXTS[3], "mem", 3))[1] > 0  # left-truncated
    return model, tok, pairs


def _step(model, ref, pairs, pad_id, options):
    policy = copy.deepcopy(model).train()
    out = pair_forward(policy, ref, pairs, LossParams(beta=0.1), pad_id, options)
    out.loss.losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_option_matches_naive_logps_loss_and_gradients(model_and_pairs, variant):
    model, tok, pairs = model_and_pairs
    # A reference that differs from the policy, so the loss is not at its ln 2 start.
    ref = models.frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    naive, naive_grads = _step(model, ref, pairs, tok.pad_token_id, NAIVE)
    fast, fast_grads = _step(model, ref, pairs, tok.pad_token_id, VARIANTS[variant])
    for name in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                 "reference_rejected_logps"):
        torch.testing.assert_close(getattr(fast, name), getattr(naive, name),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss.losses, naive.loss.losses, rtol=1e-4, atol=1e-6)
    assert fast_grads.keys() == naive_grads.keys()
    for name, grad in naive_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_prefix_sharing_and_packing_are_used_for_llama_and_gpt2(model_and_pairs):
    model, tok, pairs = model_and_pairs
    assert shared_prefix_is_exact(model)
    assert packing_is_exact(model)
    assert model.config._attn_implementation == attention.NAME
    (batch,) = layout(model, pairs, tok.pad_token_id, StepOptions())
    assert batch.input_ids.shape == (1, sum(len(p.prompt_ids) + len(p.chosen_ids)
                                            + len(p.rejected_ids) for p in pairs))
    assert batch.attention_mask is None and len(batch.segments) == len(pairs)


def test_packed_model_still_generates_and_saves_as_sdpa(tiny_llama_folder, tmp_path):
    """Outside packed batches the attention is transformers' SDPA: same logits as before,
    and a saved model does not name preftune's attention function."""
    model, _ = models.load(str(tiny_llama_folder))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert packing_is_exact(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()


def test_packing_falls_back_on_eager_attention(tiny_llama_folder):
    model, tok = models.load(str(tiny_llama_folder))
    model.set_attn_implementation("eager")
    assert not packing_is_exact(model)
    assert model.config._attn_implementation == "eager"
    batches = layout(model, _pairs(tok), tok.pad_token_id, StepOptions())
    assert all(batch.segments is None for batch in batches)


def test_chunked_head_gradients_match_autograd():
    torch.manual_seed(0)
    states = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(ChunkedHeadLogps.apply, (states, weight, bias, targets))


def test_precomputed_reference_logps_equal_live_reference(model_and_pairs):
    model, tok, pairs = model_and_pairs
    ref = models.frozen_copy(model)
    (with_ref,) = reference.attach_reference_logps(ref, [pairs], tok.pad_token_id, 2,
                                                   use_cache=False)
    live = pair_forward(model, ref, pairs, LossParams(), tok.pad_token_id)
    cached = pair_forward(model, None, with_ref, LossParams(), tok.pad_token_id)
    torch.testing.assert_close(cached.reference_chosen_logps, live.reference_chosen_logps,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.loss.losses, live.loss.losses, rtol=1e-5, atol=1e-6)


def test_reference_cache_key_changes_with_weights_data_and_tokenization(tiny_llama, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    model, tok = tiny_llama
    pairs = _pairs(tok)
    digest = reference.computed_by(reference.weights_digest(model), StepOptions(), 2)
    key = reference.cache_key(digest, pairs)
    assert reference.cache_key(digest, pairs) == key  # deterministic
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters())[0, 0] += 1e-3
    changed_digest = reference.computed_by(reference.weights_digest(changed), StepOptions(), 2)
    assert reference.cache_key(changed_digest, pairs) != key  # weights
    for other in (reference.computed_by(reference.weights_digest(model), StepOptions(), 4),
                  reference.computed_by(reference.weights_digest(model),
                                        StepOptions(packing=False), 2)):
        assert reference.cache_key(other, pairs) != key  # batching, layout
    assert reference.cache_key(digest, pairs[:-1]) != key  # data
    assert reference.cache_key(digest, _pairs(tok, max_length=40)) != key  # tokenization
    # A second attach reads the cache file instead of running the model.
    reference.attach_reference_logps(model, [pairs], tok.pad_token_id, 2)
    files = list((tmp_path / "reference_logps").iterdir())
    assert [f.name for f in files] == [f"{key}.safetensors"]
    monkeypatch.setattr(reference, "compute_reference_logps",
                        lambda *a, **k: pytest.fail("cache was not used"))
    (again,) = reference.attach_reference_logps(model, [pairs], tok.pad_token_id, 2)
    assert all(p.reference_logps is not None for p in again)


def _tiny_mistral(sliding_window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, sliding_window=sliding_window)
    return MistralForCausalLM(config).eval()


def _long_pair(index, n=40):
    ids = tuple(3 + (5 * i) % 120 for i in range(3 * n))
    return TokenizedPair(ids[:n], ids[n:2 * n], ids[2 * n:], "long", index, "")


def test_sliding_window_models_use_separate_rows_and_score_exactly():
    model = _tiny_mistral(sliding_window=8)
    assert distance_dependent_attention(model) == "sliding_window=8"
    pairs = [_long_pair(0), _long_pair(1, n=12)]
    batches = layout(model, pairs, 0, StepOptions())
    assert [b.segments for b in batches] == [None] and batches[0].attention_mask.dim() == 2
    naive = model_logps(model, layout(model, pairs, 0, NAIVE), NAIVE)
    torch.testing.assert_close(model_logps(model, batches, StepOptions()), naive,
                               rtol=1e-5, atol=1e-5)


def test_layout_self_check_reads_the_real_pairs(monkeypatch):
    """A window longer than the self-check's own pairs but shorter than the data: only the
    real pairs show that the prefix-shared mask (which replaces the window) is wrong."""
    monkeypatch.setattr(logps, "distance_dependent_attention", lambda model: None)
    assert shared_prefix_is_exact(_tiny_mistral(sliding_window=60))  # self-check pairs only
    assert not shared_prefix_is_exact(_tiny_mistral(sliding_window=60), [_long_pair(0, n=80)])


def test_full_attention_configs_are_not_distance_dependent(tiny_llama):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert distance_dependent_attention(tiny_llama[0]) is None
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, use_sliding_window=False,
                                        sliding_window=4096))
    assert distance_dependent_attention(qwen) is None


def test_a_window_counts_whatever_the_layer_types_say():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=64)
    config.layer_types = ["full_attention"] * 2  # Mistral applies the window all the same
    assert distance_dependent_attention(MistralForCausalLM(config)) == "sliding_window=64"


def test_soft_capped_logits_use_the_full_head_even_when_random_weights_hide_it():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        final_logit_softcapping=30.0)).eval()
    assert not head_only_is_exact(model)
