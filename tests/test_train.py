"""The training loop: step-0 invariants, accumulation, the run directory and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from training_runs import assert_same_steps

from preftune import models
from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import PairTokenizer
from preftune.train import step_batches, train_step

TEXTS = [
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Boil it for nine minutes.", " No."),
    ("Q: colour?", " Red", " The quick brown fox jumps over the lazy dog."),
    ("Q: a number?", " Seven", " I would rather not say."),
    ("Q: a pet?", " A cat, since it is quiet.", " Dog"),
]


def _pairs(tokenizer):
    pt = PairTokenizer(tokenizer, 128)
    return [pt(PreferencePair(p, c, r, "mem", i))[0] for i, (p, c, r) in enumerate(TEXTS)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def pair_files(tmp_path):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TEXTS]
    train = _write_jsonl(tmp_path / "train.jsonl", rows * 3)
    held = _write_jsonl(tmp_path / "eval.jsonl", rows[:2])
    return train, held


def test_first_step_loss_is_ln2_and_rewards_zero(tiny_llama):
    """Policy equal to reference: every log-ratio is 0, so loss = -log sigmoid(0) = ln 2."""
    policy, tok = tiny_llama
    reference = models.frozen_copy(policy)
    cfg = TrainConfig(batch_size=4, shuffle=False, max_grad_norm=0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    values = train_step(cfg, policy, reference, optimizer, _pairs(tok), 0,
                        tok.pad_token_id, cfg.loss_params())
    assert values["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert values["rewards/chosen"] == 0.0 and values["rewards/rejected"] == 0.0
    assert values["rewards/accuracies"] == 0.5  # every pair is a tie; a tie counts one half


def test_first_step_with_precomputed_reference_is_ln2_and_a_coin_flip(tiny_llama):
    """Precomputed reference log-probs differ from the live ones by float noise only."""
    from preftune.reference import attach_reference_logps

    policy, tok = tiny_llama
    (pairs,) = attach_reference_logps(models.frozen_copy(policy), [_pairs(tok)],
                                      tok.pad_token_id, 3, use_cache=False)
    cfg = TrainConfig(batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    values = train_step(cfg, policy, None, optimizer, pairs, 0, tok.pad_token_id,
                        cfg.loss_params())
    assert values["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(values["rewards/chosen"]) < 1e-6 and abs(values["rewards/rejected"]) < 1e-6
    assert values["rewards/accuracies"] == 0.5


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_grad_accumulation_4x1_equals_1x4(tiny_llama, optimizer_name):
    """Four micro-batches of one pair give the same loss and update as one batch of four."""
    policy, tok = tiny_llama
    pairs = _pairs(tok)
    results = []
    for batch_size, grad_accum in ((4, 1), (1, 4)):
        model = copy.deepcopy(policy).train()
        reference = models.frozen_copy(policy)
        cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, shuffle=False)
        # AdamW divides by sqrt(v): where a gradient is ~0 its step amplifies float noise,
        # so it gets a smaller lr; SGD compares the gradients themselves.
        if optimizer_name == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        values = []
        for step in range(2):
            values.append(train_step(cfg, model, reference, optimizer, pairs * 2, step,
                                     tok.pad_token_id, cfg.loss_params()))
        results.append((values, dict(model.named_parameters())))
    assert_same_steps(*results, rtol=1e-5)


def test_fused_adamw_takes_the_same_steps_as_the_default(tiny_llama):
    """make_optimizer's fused kernel is AdamW: the weights agree with torch's default
    implementation to float rounding after three steps."""
    from preftune.train import make_optimizer

    policy, tok = tiny_llama
    reference = models.frozen_copy(policy)
    cfg = TrainConfig(batch_size=4, shuffle=False, lr=1e-3, weight_decay=0.1)
    results = []
    for fused in (True, False):
        model = copy.deepcopy(policy).train()
        optimizer = make_optimizer(cfg, list(model.parameters()), fused=fused)
        assert bool(optimizer.param_groups[0]["fused"]) is fused
        values = [train_step(cfg, model, reference, optimizer, _pairs(tok), step,
                             tok.pad_token_id, cfg.loss_params()) for step in range(3)]
        results.append((values, dict(model.named_parameters())))
    assert_same_steps(*results, rtol=1e-5)
    start = dict(policy.named_parameters())
    assert any(not torch.equal(value, start[name]) for name, value in results[0][1].items())


@pytest.mark.parametrize("precompute", [True, False])
def test_precomputed_reference_is_the_policy_itself_not_a_copy(
    tmp_path, tiny_llama_folder, pair_files, monkeypatch, precompute
):
    """Precomputed reference log-probs are the policy's own before its first update, so no
    copy of the weights is made; a live reference is a copy. Step 0 is ln 2 either way."""
    train_file, eval_file = pair_files
    copies = []
    real_copy = models.frozen_copy
    monkeypatch.setattr(models, "frozen_copy", lambda m: copies.append(1) or real_copy(m))
    out = tmp_path / "run"
    flag = "--precompute-reference" if precompute else "--no-precompute-reference"
    assert main(["train", "--model", str(tiny_llama_folder), "--data", str(train_file),
                 "--eval-data", str(eval_file), "--output", str(out), "--max-steps", "2",
                 "--lr", "1e-3", "--num-samples", "0", flag, "--no-progress"]) == 0
    assert len(copies) == (0 if precompute else 1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    assert evals[0]["step"] == 0
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval/loss"] != evals[0]["eval/loss"]  # the policy moved, not its reference


def test_pairs_read_are_those_of_the_steps_run(tiny_llama):
    """A run that ends within its first epoch precomputes reference log-probs only for the
    pairs its steps read; one that reaches a second epoch reads every pair."""
    from preftune.train import batch_indices, pairs_read

    _, tok = tiny_llama
    pairs = _pairs(tok) * 5  # 20 pairs
    cfg = TrainConfig(batch_size=2, grad_accum=2, seed=1)
    read = pairs_read(cfg, pairs, 3)  # 12 of 20
    expected = {i for step in range(3) for batch in batch_indices(cfg, pairs, step)
                for i in batch}
    assert read == sorted(expected) and len(read) == 12
    assert pairs_read(cfg, pairs, 3, world_size=2) == list(range(20))  # 24 >= 20
    assert pairs_read(cfg, pairs, 5) == list(range(20))


def test_step_batches_cover_each_epoch_once():
    cfg = TrainConfig(batch_size=2, grad_accum=2, seed=3)
    seen = [i for step in range(5) for micro in step_batches(cfg, 10, step) for i in micro]
    assert sorted(seen[:10]) == list(range(10))
    assert sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new order each epoch


def test_train_cli_writes_a_complete_run_directory(tmp_path, tiny_llama_folder, pair_files):
    train_file, eval_file = pair_files
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"lr": 1e-3, "max_steps": 99, "batch_size": 2}))
    out = tmp_path / "run"
    code = main([
        "train", "--config", str(config), "--model", str(tiny_llama_folder),
        "--data", str(train_file), "--eval-data", str(eval_file), "--output", str(out),
        "--max-steps", "3", "--eval-every", "2", "--num-samples", "1",
        "--sample-max-new-tokens", "4", "--no-progress",
    ])
    assert code == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 3  # the flag won over the file
    assert resolved["lr"] == 1e-3 and resolved["batch_size"] == 2  # the file filled the rest
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in eval_rows] == [0, 2, 3]
    assert eval_rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate",
                "tokens_per_second"):
        assert key in train_rows[0]
    assert all(0 <= r["eval/rewards/accuracies"] <= 1 for r in eval_rows)
    report = json.loads((out / "data_report.json").read_text())
    assert report["num_read"] == 14 and report["num_dropped"] == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and set(samples[0]) >= {"prompt", "reference", "policy"}
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_folder)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(trained.state_dict().values(), original.state_dict().values()))
    assert changed


def test_existing_run_directory_is_refused(tmp_path, tiny_llama_folder, pair_files, capsys):
    train_file, _ = pair_files
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    code = main(["train", "--model", str(tiny_llama_folder), "--data", str(train_file),
                 "--output", str(out), "--max-steps", "1", "--no-progress"])
    assert code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"  # nothing the user had is lost


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--beta", "0", "--beta"),
        ("--batch-size", "0", "--batch-size must be >= 1"),
        ("--lr", "abc", "--lr expects float"),
        ("--scheduler", "exp", "--scheduler must be one of"),
    ],
)
def test_bad_flags_name_the_flag(flag, value, message, capsys):
    assert main(["train", flag, value]) == 2
    assert message in capsys.readouterr().err
