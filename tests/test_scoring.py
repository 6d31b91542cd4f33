"""Scoring responses: batching invariance, rewards against hand-computed log-probs, ranking,
Wilson intervals, input checks, and the unseen-pairs example."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune import models
from preftune.data.formats import PreferencePair
from preftune.data.report import DataError
from preftune.data.tokenize import PairTokenizer
from preftune.evaluate import EvalResult
from preftune.scoring import (
    parse_score_record,
    preference_probabilities,
    rank,
    read_score_records,
    score_rows,
    score_sequences,
    summarize,
    tokenize_records,
    wilson_interval,
    write_jsonl_atomic,
)

REPO = Path(__file__).resolve().parents[1]

RESPONSES = [
    "Four.",
    "Paris is the capital of France.",
    "No",
    "I would rather not say.",
    "The quick brown fox jumps over the lazy dog, twice, and then rests.",
    "Seven",
    "Red, blue and yellow are the primary colours of paint.",
    "Yes.",
    "Water boils at 100 C.",
    "Eight legs.",
    "A cat.",
    "Oxygen, mostly, and a little of everything else in the air.",
    "Rome",
    "Cold.",
    "Seven days make a week.",
    "Great question! Four. Hope this helps!",
]


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A second model with the same tokenizer whose log-probs differ from ``model``'s."""
    other = models.frozen_copy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return other


def _items(tokenizer, prompt="What should I answer?", responses=RESPONSES):
    pt = PairTokenizer(tokenizer, 256)
    records = [parse_score_record({"prompt": prompt, "responses": list(responses)}, 1)]
    return records, tokenize_records(records, pt, "mem")


def test_scores_alone_equal_scores_in_a_batch_of_16(tiny_llama):
    """Right padding and masking make each row's log-probs independent of its batch mates."""
    policy, tok = tiny_llama
    reference = _perturbed(policy)
    _, items = _items(tok)
    prompts, responses = [i.prompt_ids for i in items], [i.response_ids for i in items]
    assert len(items) == 16 and len({len(r) for r in responses}) > 5  # real padding happens
    batched = score_sequences(policy, reference, prompts, responses, tok.pad_token_id, 16)
    alone = score_sequences(policy, reference, prompts, responses, tok.pad_token_id, 1)
    torch.testing.assert_close(batched.policy_logps, alone.policy_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.reference_logps, alone.reference_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.rewards(0.1), alone.rewards(0.1), rtol=0, atol=1e-5)
    assert batched.num_tokens.tolist() == [len(r) for r in responses]
    assert not torch.equal(batched.policy_logps, batched.reference_logps)


def _hand_logps(model, prompt_ids, response_ids) -> float:
    """Sum over response tokens of log_softmax(logits at t - 1)[token t], one token at a time."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    total = 0.0
    for t in range(len(prompt_ids), ids.shape[1]):
        total += float(logps[t - 1, ids[0, t]])
    return total


def test_reward_difference_is_beta_times_hand_computed_logratios(tiny_llama):
    """r_a - r_b = beta * ((pi_a - ref_a) - (pi_b - ref_b)), every log-prob from full logits."""
    policy, tok = tiny_llama
    reference = _perturbed(policy, seed=2)
    beta = 0.5
    records, items = _items(tok, responses=RESPONSES[:2])
    scores = score_sequences(
        policy,
        reference,
        [i.prompt_ids for i in items],
        [i.response_ids for i in items],
        tok.pad_token_id,
        2,
    )
    rows = score_rows(records, items, scores, beta)
    hand = [
        _hand_logps(policy, i.prompt_ids, i.response_ids)
        - _hand_logps(reference, i.prompt_ids, i.response_ids)
        for i in items
    ]
    assert rows[0]["reward"] - rows[1]["reward"] == pytest.approx(
        beta * (hand[0] - hand[1]), abs=1e-5
    )
    for row, item in zip(rows, items):
        assert row["policy_logps"] == pytest.approx(
            _hand_logps(policy, item.prompt_ids, item.response_ids), abs=1e-4
        )
        assert row["mean_policy_logps"] == pytest.approx(
            row["policy_logps"] / len(item.response_ids)
        )


def test_responses_tokenize_as_the_chosen_side_of_training_pairs(smollm_tokenizer):
    """A scored response gets exactly the ids training gives it as a chosen response."""
    pt = PairTokenizer(smollm_tokenizer, 64)
    prompt = ({"role": "user", "content": "Name a colour."},)
    record = parse_score_record(
        {"prompt": [dict(prompt[0])], "chosen": "Red.", "rejected": "Well, maybe blue."}, 3
    )
    items = tokenize_records([record], pt, "mem")
    pair = PreferencePair(
        prompt,
        ({"role": "assistant", "content": "Red."},),
        ({"role": "assistant", "content": "Well, maybe blue."},),
        "mem",
        3,
    )
    expected, _ = pt(pair)
    assert items[0].prompt_ids == expected.prompt_ids
    assert items[0].response_ids == expected.chosen_ids
    assert items[1].response_ids == expected.rejected_ids
    assert smollm_tokenizer.decode(items[0].response_ids) == "Red.<|im_end|>"


def test_rank_puts_ties_on_the_better_rank():
    assert rank(torch.tensor([0.3, 1.0, 0.3, -2.0])) == [2, 1, 2, 4]


def test_preference_probabilities_are_bradley_terry():
    """P[i, j] = sigmoid(r_i - r_j): sigmoid(1.0 - 0.3) = 1 / (1 + e^-0.7) = 0.668188."""
    p = preference_probabilities(torch.tensor([0.3, 1.0, -2.0]))
    assert float(p[1, 0]) == pytest.approx(0.668188, abs=1e-6)
    assert float(p[0, 2]) == pytest.approx(1 / (1 + math.exp(-2.3)), abs=1e-6)
    torch.testing.assert_close(p + p.T, torch.ones(3, 3))


def test_score_rows_rank_and_label_several_responses(tiny_llama):
    policy, tok = tiny_llama
    reference = _perturbed(policy)
    pt = PairTokenizer(tok, 128)
    records = [
        parse_score_record({"prompt": "Q: colour?", "response": " Red"}, 1),
        parse_score_record({"prompt": "Q: colour?", "chosen": " Red", "rejected": " Blue"}, 2),
        parse_score_record({"prompt": "Q: pet?", "responses": [" A cat", " Dog", " Fish"]}, 3),
    ]
    items = tokenize_records(records, pt, "mem")
    scores = score_sequences(
        policy,
        reference,
        [i.prompt_ids for i in items],
        [i.response_ids for i in items],
        tok.pad_token_id,
    )
    rows = score_rows(records, items, scores, 0.1)
    assert [r["record"] for r in rows] == [1, 2, 2, 3, 3, 3]
    assert "rank" not in rows[0]  # a single response has nothing to be ranked against
    assert [r["label"] for r in rows[1:3]] == ["chosen", "rejected"]
    pets = rows[3:]
    rewards = [r["reward"] for r in pets]
    assert sorted(r["rank"] for r in pets) == [1, 2, 3]
    assert pets[max(range(3), key=rewards.__getitem__)]["rank"] == 1
    p01 = pets[0]["preference_probabilities"][1]
    assert p01 == pytest.approx(1 / (1 + math.exp(-(rewards[0] - rewards[1]))), abs=1e-6)
    assert pets[0]["preference_probabilities"][0] is None


@pytest.mark.parametrize(
    "accuracy, n, low, high",
    [
        # p = 0.8, n = 10, z^2 = 3.841459: centre (0.8 + 0.192073) / 1.384146 = 0.716737,
        # half 1.959964 * sqrt(0.016 + 0.009604) / 1.384146 = 0.226580.
        (0.8, 10, 0.490157, 0.943317),
        # p = 0.5, n = 2: symmetric about 0.5.
        (0.5, 2, 0.09453, 0.90547),
        # p = 0, n = 20: the lower end is 0, the upper z^2 / (n + z^2) = 3.8415 / 23.8415.
        (0.0, 20, 0.0, 0.16113),
    ],
)
def test_wilson_interval_matches_hand_values(accuracy, n, low, high):
    lo, hi = wilson_interval(accuracy, n)
    assert lo == pytest.approx(low, abs=1e-5)
    assert hi == pytest.approx(high, abs=1e-5)


def test_summarize_takes_the_median_of_per_pair_margins():
    """Margins -0.2, 0.1, 0.3, 0.5: the median is (0.1 + 0.3) / 2 = 0.2."""
    rows = [{"margin": m} for m in (0.1, -0.2, 0.5, 0.3)]
    metrics = {"rewards/accuracies": 0.75, "rewards/margins": 0.175, "loss": 0.6}
    s = summarize(EvalResult(metrics, rows))
    assert s.margin_median == pytest.approx(0.2)
    assert (s.accuracy, s.margin_mean, s.loss, s.num_pairs) == (0.75, 0.175, 0.6, 4)
    assert s.accuracy_ci == pytest.approx(wilson_interval(0.75, 4))


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"response": "Hi"}, "missing field 'prompt'"),
        ({"prompt": "Hi"}, "missing field 'response'"),
        ({"prompt": "Hi", "response": "a", "responses": ["b"]}, "give only one of them"),
        ({"prompt": "Hi", "responses": []}, "field 'responses' is empty"),
        ({"prompt": "Hi", "responses": "a"}, "field 'responses' is text, expected an array"),
        ({"prompt": "Hi", "responses": ["a", "  "]}, "empty response in 'responses[1]'"),
        ({"prompt": "Hi", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": " ", "response": "a"}, "empty prompt"),
        (
            {"prompt": "Hi", "response": [{"role": "assistant", "content": "a"}]},
            "field 'response' is an array but 'prompt' is text",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "response": [{"role": "user", "content": "a"}],
            },
            "non-assistant message",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "response": [{"role": "assistant", "content": ""}],
            },
            "empty response in 'response'",
        ),
        (
            {"prompt": [{"role": "assistant", "content": "Hi"}], "response": "a"},
            "prompt ends with an assistant message",
        ),
        (
            {"prompt": "Hi", "responses": ["fine", "bad \ud800"]},
            "field 'responses[1]' has a lone surrogate '\\ud800' at character 4",
        ),
    ],
)
def test_bad_records_name_file_line_and_reason(tmp_path, record, reason):
    path = tmp_path / "in.jsonl"
    good = json.dumps({"prompt": "fine", "response": "fine"})
    path.write_text(good + "\n\n" + json.dumps(record) + "\n")  # the bad record is on line 3
    with pytest.raises(DataError) as err:
        read_score_records(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and reason in message


def test_text_response_to_a_chat_prompt_becomes_an_assistant_message():
    rec = parse_score_record({"prompt": [{"role": "user", "content": "Hi"}], "response": "Yo"}, 1)
    assert rec.responses == (({"role": "assistant", "content": "Yo"},),)


def test_failed_write_leaves_no_file(tmp_path):
    def rows():
        yield {"a": 1}
        raise RuntimeError("scoring failed half way")

    out = tmp_path / "scores.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(out, rows())
    assert list(tmp_path.iterdir()) == []
    write_jsonl_atomic(out, [{"a": 1}, {"b": 2}])
    assert out.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_unseen_pairs_example_is_new_to_the_demo_data():
    """24 prompts and filler phrases absent from the demo; each rejected wraps its chosen."""
    demo_dir = REPO / "src" / "preftune" / "data" / "demo"
    demo = [
        json.loads(line)
        for f in ("train.jsonl", "eval.jsonl")
        for line in (demo_dir / f).read_text().splitlines()
    ]
    demo_text = " ".join(r["rejected"][0]["content"] for r in demo)
    demo_prompts = {r["prompt"][0]["content"].lower() for r in demo}
    rows = [
        json.loads(line)
        for line in (REPO / "examples" / "unseen_pairs.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 24
    prompts = [r["prompt"][0]["content"] for r in rows]
    assert len(set(prompts)) == 24 and not demo_prompts & {p.lower() for p in prompts}
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert len(chosen.split()) <= 28
        assert chosen in rejected and rejected != chosen
        filler = [s.strip() for s in rejected.split(chosen)]
        for part in filler:
            for sentence in part.replace("!", "!|").replace(".", ".|").split("|"):
                if sentence.strip():
                    assert sentence.strip() not in demo_text, sentence


@pytest.mark.parametrize("kind", ["folder", "below a file"])
def test_score_refuses_an_output_it_could_not_write_before_any_work(tmp_path, capsys, kind):
    """An --output that is a folder, or below a file, is refused with one line and exit 2
    before the input is read or a model loaded (the run does not exist)."""
    from preftune.cli import main

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "Q", "response": "A"}) + "\n")
    out = tmp_path if kind == "folder" else inputs / "scores.jsonl"
    code = main(["score", str(tmp_path / "no-run"), "--input", str(inputs), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("preftune: error: --output") and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
