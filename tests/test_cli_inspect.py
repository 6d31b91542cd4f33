"""`preftune score`, `eval` and `compare` on short training runs of a tiny model.

The runs train 3 steps at a high learning rate so that the policy really moves; some
held-out pairs have chosen and rejected swapped, so the policy gets those wrong and the
accuracies compared below are not all 1.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.runs import check_same_tokenizer
from preftune.train import train

QA = [
    ("What is two plus two?", "Four."),
    ("Name a primary colour.", "Red."),
    ("What is ice made of?", "Frozen water."),
    ("How many legs does a spider have?", "Eight."),
    ("What gas do we breathe in?", "Oxygen."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the opposite of hot?", "Cold."),
    ("How many days are in a week?", "Seven."),
    ("What colour is grass?", "Green."),
    ("How many wheels does a bicycle have?", "Two."),
]
HELD_OUT = [
    ("What do bees make?", "Honey."),
    ("Which animal barks?", "A dog."),
    ("What is frozen rain called?", "Hail."),
    ("How many months are in a year?", "Twelve."),
    ("Which planet do we live on?", "Earth."),
    ("What do cows drink?", "Water."),
]


def _pair(question: str, answer: str, swap: bool = False) -> dict:
    chosen, rejected = answer, f"Oh, what a lovely question! {answer} Hope that helps you!"
    if swap:
        chosen, rejected = rejected, chosen
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(folder, tmp, model, **overrides):
    cfg = TrainConfig(
        model=str(model),
        output=str(tmp / "run"),
        max_steps=3,
        lr=1e-2,
        batch_size=2,
        warmup_ratio=0.0,
        eval_every=0,
        num_samples=0,
        progress=False,
        **overrides,
    )
    train(cfg)
    return tmp / "run"


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, tiny_llama_folder):
    """A run with an eval file: 4 held-out pairs as labelled, 2 with the labels swapped."""
    tmp = tmp_path_factory.mktemp("inspect-run")
    train_file = _write(tmp / "train.jsonl", [_pair(q, a) for q, a in QA])
    eval_file = _write(
        tmp / "eval.jsonl", [_pair(q, a, swap=i >= 4) for i, (q, a) in enumerate(HELD_OUT)]
    )
    run = _train(
        tiny_llama_folder, tmp, tiny_llama_folder, data=str(train_file), eval_data=str(eval_file)
    )
    return run, eval_file


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, tiny_llama_folder):
    """A run whose held-out pairs are a seeded eval_fraction share of its training file."""
    tmp = tmp_path_factory.mktemp("inspect-split")
    rows = [_pair(q, a, swap=i % 4 == 3) for i, (q, a) in enumerate(QA + HELD_OUT)]
    data = _write(tmp / "pairs.jsonl", rows)
    return _train(
        tiny_llama_folder, tmp, tiny_llama_folder, data=str(data), eval_fraction=0.375, seed=5
    )


def _final_eval(run) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r][-1]


def _final_eval_pairs(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "eval_pairs.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == last]


def _eval_json(capsys, *args) -> dict:
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("which", ["eval_data", "eval_fraction"])
def test_eval_reports_the_final_training_eval(which, run_files, split_run, capsys):
    """On the run's own held-out pairs, accuracy, margin and loss are training's last eval row."""
    run = run_files[0] if which == "eval_data" else split_run
    final = _final_eval(run)
    out = _eval_json(capsys, run)
    assert out["num_pairs"] == len(_final_eval_pairs(run))
    assert out["accuracy"] == pytest.approx(final["eval/rewards/accuracies"], abs=1e-6)
    assert out["margin_mean"] == pytest.approx(final["eval/rewards/margins"], abs=1e-6)
    assert out["loss"] == pytest.approx(final["eval/loss"], abs=1e-6)
    margins = [r["margin"] for r in _final_eval_pairs(run)]
    assert out["margin_median"] == pytest.approx(statistics.median(margins), abs=1e-6)
    assert 0 < final["eval/rewards/accuracies"] < 1  # swapped pairs make it a real test
    lo, hi = out["accuracy_ci"]
    assert lo < out["accuracy"] < hi and out["accuracy_ci_method"] == "wilson, 95%"


def test_eval_baseline_is_the_reference_against_itself(run_files, capsys):
    """Every baseline margin is 0: accuracy 0.5 (ties count one half), loss ln 2."""
    run, _ = run_files
    base = _eval_json(capsys, run)["baseline"]
    assert base["accuracy"] == 0.5
    assert base["margin_mean"] == 0.0 and base["margin_median"] == 0.0
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_eval_on_a_file_and_with_a_limit(run_files, capsys):
    run, eval_file = run_files
    same = _eval_json(capsys, run, "--data", eval_file)
    assert same["accuracy"] == pytest.approx(_final_eval(run)["eval/rewards/accuracies"])
    first = _eval_json(capsys, run, "--data", eval_file, "--limit", 4)
    expected = [r["margin"] for r in _final_eval_pairs(run)][:4]
    assert first["num_pairs"] == 4
    assert first["margin_mean"] == pytest.approx(statistics.fmean(expected), abs=1e-6)
    worst = same["worst_pairs"]
    assert [w["margin"] for w in worst] == sorted(w["margin"] for w in worst)
    assert worst[0]["margin"] == pytest.approx(min(r["margin"] for r in _final_eval_pairs(run)))


def test_eval_table_names_the_interval_and_the_baseline(run_files, capsys):
    run, _ = run_files
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "95% CI (Wilson)" in out and "0.5 by construction" in out
    assert "lowest margin first" in out


def test_score_ranking_agrees_with_eval_accuracy(run_files, tmp_path, capsys):
    """Chosen ranked above rejected by `score` exactly where `eval` counts the pair correct."""
    run, eval_file = run_files
    out = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                str(run),
                "--input",
                str(eval_file),
                "--output",
                str(out),
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * len(HELD_OUT)
    wins, margins = [], []
    for chosen, rejected in zip(rows[::2], rows[1::2]):
        assert (chosen["label"], rejected["label"]) == ("chosen", "rejected")
        wins.append(1.0 if chosen["rank"] < rejected["rank"] else 0.0)
        margins.append(chosen["reward"] - rejected["reward"])
        assert chosen["reward"] == pytest.approx(
            0.1 * (chosen["policy_logps"] - chosen["reference_logps"]), abs=1e-6
        )
    final = _final_eval(run)
    assert min(abs(m) for m in margins) > 1e-4  # no ties to set aside
    assert statistics.fmean(wins) == pytest.approx(final["eval/rewards/accuracies"], abs=1e-6)
    per_pair = [r["margin"] for r in _final_eval_pairs(run)]
    assert margins == pytest.approx(per_pair, abs=1e-5)


def test_score_beta_flag_scales_rewards(run_files, tmp_path, capsys):
    run, eval_file = run_files
    outs = []
    for beta in ("0.1", "0.5"):
        out = tmp_path / f"scores-{beta}.jsonl"
        assert (
            main(
                ["score", str(run), "--input", str(eval_file), "--output", str(out), "--beta", beta]
            )
            == 0
        )
        outs.append([json.loads(line)["reward"] for line in out.read_text().splitlines()])
    assert outs[1] == pytest.approx([5 * r for r in outs[0]], rel=1e-6)


def test_model_spec_scored_against_itself_has_zero_rewards(tiny_llama_folder, tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "Q: colour?", "responses": [" Red", " Blue"]}])
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "score",
                str(tiny_llama_folder),
                "--reference",
                str(tiny_llama_folder),
                "--input",
                str(src),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [0.0, 0.0]
    assert [r["rank"] for r in rows] == [1, 1]  # a tie shares the better rank
    assert rows[0]["preference_probabilities"] == [None, 0.5]


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"prompt": "Q?", "response": "A"}', '{"prompt": "Q?"}'],
            "in.jsonl:2: missing field 'response'",
        ),
        (['{"response": "A"}'], "in.jsonl:1: missing field 'prompt'"),
        (
            ['{"prompt": "Q?", "responses": ["A", ""]}'],
            "in.jsonl:1: empty response in 'responses[1]'",
        ),
        (['{"prompt": "Q?", "response": "A"}', "{not json"], "in.jsonl:2: "),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(lines, message, run_files, tmp_path, capsys):
    run, _ = run_files
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "scores.jsonl"
    assert main(["score", str(run), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unknown_run_directory_exits_2(tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "Q?", "response": "A"}])
    out = tmp_path / "out.jsonl"
    for spec in (str(tmp_path / "no-such-run"), "./runs/missing"):
        assert main(["score", spec, "--input", str(src), "--output", str(out)]) == 2
        assert "no such run directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2  # a folder that is neither run nor model
    assert "neither a run directory" in capsys.readouterr().err
    assert not out.exists()


def test_model_spec_without_reference_is_refused(tiny_llama_folder, tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "Q?", "response": "A"}])
    out = tmp_path / "out.jsonl"
    assert main(["score", str(tiny_llama_folder), "--input", str(src), "--output", str(out)]) == 2
    assert "pass --reference" in capsys.readouterr().err
    assert not out.exists()


def test_different_tokenizers_are_refused(run_files, gpt2_folder, tmp_path, capsys):
    run, eval_file = run_files
    out = tmp_path / "out.jsonl"
    code = main(
        [
            "score",
            str(run),
            "--reference",
            str(gpt2_folder),
            "--input",
            str(eval_file),
            "--output",
            str(out),
        ]
    )
    assert code == 2
    assert "have different tokenizers: vocabularies of" in capsys.readouterr().err
    assert not out.exists()


def test_a_different_special_token_is_refused(tiny_llama_folder, tmp_path):
    """Same vocabulary, another EOS: responses would end on different tokens."""
    policy = AutoTokenizer.from_pretrained(tiny_llama_folder)
    other_folder = tmp_path / "other"
    shutil.copytree(tiny_llama_folder, other_folder)
    AutoTokenizer.from_pretrained(tiny_llama_folder, eos_token="<|endoftext|>").save_pretrained(
        other_folder
    )
    other = AutoTokenizer.from_pretrained(other_folder)
    with pytest.raises(ValueError, match="eos_token '<|im_end|>' vs '<|endoftext|>'"):
        check_same_tokenizer(policy, other, "p", "r")
    check_same_tokenizer(policy, AutoTokenizer.from_pretrained(tiny_llama_folder), "p", "r")


def test_compare_writes_one_row_per_prompt(run_files, tmp_path, capsys):
    run, eval_file = run_files
    out = tmp_path / "compare.jsonl"
    assert (
        main(
            [
                "compare",
                str(run),
                "--prompts",
                str(eval_file),
                "--output",
                str(out),
                "--max-new-tokens",
                "3",
                "--sample",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["record"] for r in rows] == list(range(1, len(HELD_OUT) + 1))
    for row in rows:
        for side in ("reference", "policy"):
            g = row[side]
            assert g["reward"] == pytest.approx(
                0.1 * (g["policy_logps"] - g["reference_logps"]), abs=1e-6
            )
        assert row["kl_estimate"] == pytest.approx(
            row["policy"]["policy_logps"] - row["policy"]["reference_logps"], abs=1e-5
        )
    printed = capsys.readouterr().out
    kl = statistics.fmean(r["kl_estimate"] for r in rows)
    assert f"KL(policy || reference) ~ {kl:.4f}" in printed
    assert "What do bees make?" in printed
