"""Side-by-side generation: rewards of each generation, the KL estimate, seeding, the table."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from preftune import models
from preftune.compare import (
    CompareResult,
    Comparison,
    Generation,
    compare,
    format_table,
    read_prompts,
    sample_seed,
)
from preftune.data.formats import PreferencePair
from preftune.data.report import DataError
from preftune.losses import LossParams
from preftune.runs import OpenedRun
from preftune.samples import generate
from preftune.scoring import score_sequences

PROMPTS = [
    {"prompt": "Q: colour?"},
    {"prompt": [{"role": "user", "content": "Name a pet."}], "chosen": "ignored"},
    {"prompt": "Q: a number?"},
]


def _run(model, tokenizer, reference, beta=0.5) -> OpenedRun:
    return OpenedRun(
        model, reference, tokenizer, LossParams(beta=beta), 128, "auto", "policy", "reference", None
    )


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    other = models.frozen_copy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return other


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def test_prompts_render_as_in_training(tiny_llama, prompts_file):
    """A chat prompt's ids are those training gives the prompt of a pair."""
    model, tok = tiny_llama
    run = _run(model, tok, model)
    prompts = read_prompts(str(prompts_file), run)
    assert [p.record for p in prompts] == [1, 2, 3]
    chat = ({"role": "user", "content": "Name a pet."},)
    reply = ({"role": "assistant", "content": "A cat."},)
    expected, _ = run.pair_tokenizer()(PreferencePair(chat, reply, reply, "mem", 2))
    assert prompts[1].prompt_ids == expected.prompt_ids
    assert tok.decode(prompts[1].prompt_ids).endswith("<|im_start|>assistant\n")


def test_prompt_without_prompt_field_names_line(tiny_llama, tmp_path):
    model, tok = tiny_llama
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"question": "where?"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'prompt'"):
        read_prompts(str(path), _run(model, tok, model))


def test_policy_equal_to_reference_has_zero_rewards_and_zero_kl(tiny_llama, prompts_file):
    """Same model on both sides: every log-ratio is exactly 0, so is the KL estimate."""
    model, tok = tiny_llama
    run = _run(model, tok, model)
    result = compare(
        run,
        read_prompts(str(prompts_file), run),
        max_new_tokens=5,
        sample=True,
        seed=3,
        kl_samples=2,
    )
    for row in result.rows:
        assert row.policy.text == row.reference.text  # same model, same seed
        assert row.policy.reward == 0.0 and row.reference.reward == 0.0
        assert row.kl_logratios == [0.0, 0.0]
    assert result.summary()["kl_estimate"] == 0.0


def test_rewards_and_kl_are_log_ratios_of_the_generated_tokens(tiny_llama, prompts_file):
    """Each reward is beta * (policy - reference) log-probs of exactly the generated ids, and
    the KL estimate is the mean log-ratio of the policy samples drawn with the stated seeds."""
    policy, tok = tiny_llama
    reference = _perturbed(policy)
    run = _run(policy, tok, reference, beta=0.5)
    prompts = read_prompts(str(prompts_file), run)
    result = compare(run, prompts, max_new_tokens=6, sample=True, seed=11, kl_samples=2)
    all_ratios = []
    for i, (prompt, row) in enumerate(zip(prompts, result.rows)):
        draws = [
            generate(policy, tok, prompt.prompt_ids, 6, True, sample_seed(11, i, d))
            for d in range(2)
        ]
        ref_draw = generate(reference, tok, prompt.prompt_ids, 6, True, sample_seed(11, i, 0))
        assert row.policy.text == tok.decode(draws[0], skip_special_tokens=True)
        assert row.reference.text == tok.decode(ref_draw, skip_special_tokens=True)
        scores = score_sequences(
            policy, reference, [prompt.prompt_ids] * 3, [ref_draw, *draws], tok.pad_token_id, 1
        )
        ratios = (scores.policy_logps - scores.reference_logps).tolist()
        assert row.reference.reward == pytest.approx(0.5 * ratios[0], abs=1e-5)
        assert row.policy.reward == pytest.approx(0.5 * ratios[1], abs=1e-5)
        assert row.kl_logratios == pytest.approx(ratios[1:], abs=1e-5)
        all_ratios += ratios[1:]
    summary = result.summary()
    assert summary["kl_estimate"] == pytest.approx(statistics.fmean(all_ratios), abs=1e-5)
    assert summary["kl_stderr"] == pytest.approx(
        statistics.stdev(all_ratios) / len(all_ratios) ** 0.5, abs=1e-5
    )
    assert any(abs(r) > 1e-3 for r in all_ratios)  # the two models do differ


def test_greedy_is_deterministic_and_gives_no_kl_estimate(tiny_llama, prompts_file):
    policy, tok = tiny_llama
    run = _run(policy, tok, _perturbed(policy))
    prompts = read_prompts(str(prompts_file), run)
    first = compare(run, prompts, max_new_tokens=4)
    second = compare(run, prompts, max_new_tokens=4)
    assert [r.policy.text for r in first.rows] == [r.policy.text for r in second.rows]
    summary = first.summary()
    assert summary["kl_estimate"] is None and summary["decoding"] == "greedy"
    assert summary["greedy_logratio_mean"] == pytest.approx(
        statistics.fmean(r.policy.logratio for r in first.rows)
    )
    with_kl = compare(run, prompts, max_new_tokens=4, kl_samples=2)
    assert [len(r.kl_logratios) for r in with_kl.rows] == [2, 2, 2]
    assert [r.policy.text for r in with_kl.rows] == [r.policy.text for r in first.rows]


def test_table_shows_both_generations_side_by_side():
    row = Comparison(
        4,
        "Q: colour?",
        Generation("Blue, I think.", 5, -3.0, -2.0, -0.1),
        Generation("\n\n\n", 3, -1.0, -2.0, 0.1),
    )
    table = format_table(CompareResult([row], sample=False, kl_samples=0), width=60)
    lines = table.splitlines()
    assert lines[1] == "[4] Q: colour?"
    assert lines[2].startswith("reference  reward -0.100") and "| policy  reward +0.100" in lines[2]
    assert lines[4] == f"{'Blue, I think.':<28} | (whitespace only, 3 characters)"
