"""Precision and memory options: bfloat16 weights, autocast, float32 log-probs and loss, the
float16 refusal, and gradient checkpointing that changes nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from training_runs import assert_same_steps, metric_rows, train_args, write_pairs

from preftune import models
from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data.collate import collate_pairs
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import PairTokenizer
from preftune.forward import StepOptions, model_logps, pair_forward
from preftune.logps import sequence_logps
from preftune.policy import enable_checkpointing
from preftune.train import train_step

TEXTS = [
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Boil it for nine minutes.", " No."),
    ("Q: colour?", " Red", " The quick brown fox jumps over the lazy dog."),
]
# bfloat16 keeps 8 bits of mantissa: one rounding is up to 2^-8 = 0.4% of a value.
BF16_RTOL = 2e-2


def _pairs(tokenizer):
    pt = PairTokenizer(tokenizer, 128)
    return [pt(PreferencePair(p, c, r, "mem", i))[0] for i, (p, c, r) in enumerate(TEXTS)]


def test_float16_is_refused_naming_the_flag(capsys):
    assert main(["train", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype float16 is not supported" in err and "bfloat16" in err


@pytest.mark.parametrize("head_only", [True, False])
def test_logps_and_loss_are_float32_with_bfloat16_weights(tiny_llama_folder, head_only):
    model, tokenizer = models.load(str(tiny_llama_folder), dtype="bfloat16")
    options = StepOptions(head_only=head_only, prefix_sharing=False)
    out = pair_forward(model, models.frozen_copy(model), _pairs(tokenizer),
                       TrainConfig().loss_params(), tokenizer.pad_token_id, options)
    assert out.policy_chosen_logps.dtype == torch.float32
    assert out.loss.losses.dtype == torch.float32
    assert out.loss.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-6)


def test_bfloat16_logps_match_float32_within_bfloat16_tolerance(tiny_llama_folder):
    fp32, tokenizer = models.load(str(tiny_llama_folder))
    bf16, _ = models.load(str(tiny_llama_folder), dtype="bfloat16")
    batches = [collate_pairs(_pairs(tokenizer), tokenizer.pad_token_id)]
    with torch.no_grad():
        exact = model_logps(fp32, batches, StepOptions())
        weights = model_logps(bf16, batches, StepOptions())
        autocast = model_logps(fp32, batches, StepOptions(autocast=True))
    for approx in (weights, autocast):
        assert approx.dtype == torch.float32
        relative = ((approx - exact).abs() / exact.abs()).max().item()
        assert 0 < relative < BF16_RTOL  # rounded, but within bfloat16's precision


def test_autocast_head_only_gradients_match_the_full_logits_path(tiny_llama_folder):
    """The chunked head's own backward, outside autocast, casts as autocast's forward did."""
    model, tokenizer = models.load(str(tiny_llama_folder))
    batch = collate_pairs(_pairs(tokenizer), tokenizer.pad_token_id)
    grads = []
    for head_only in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = sequence_logps(model, batch, head_only=head_only)
        assert logps.dtype == torch.float32
        logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    fast, full = grads
    for name, grad in full.items():
        assert fast[name].dtype == torch.float32
        torch.testing.assert_close(fast[name], grad, rtol=BF16_RTOL, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_loss_and_update(tiny_llama):
    policy, tokenizer = tiny_llama
    pairs = _pairs(tokenizer) * 2
    cfg = TrainConfig(batch_size=2, grad_accum=2, shuffle=False)
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(policy).train()
        if checkpointing:
            enable_checkpointing(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        values = [train_step(cfg, model, models.frozen_copy(policy), optimizer, pairs, step,
                             tokenizer.pad_token_id, cfg.loss_params()) for step in range(2)]
        results.append((values, dict(model.named_parameters())))
    assert_same_steps(*results, rtol=1e-6)


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--autocast"]])
def test_bfloat16_run_trains_with_finite_metrics(tmp_path, tiny_llama_folder, flags):
    data = write_pairs(tmp_path)
    runs = {}
    for name, extra in (("fp32", []), ("bf16", flags)):
        out = tmp_path / name
        assert main(train_args(tiny_llama_folder, data, out, "--max-steps", "4",
                               "--save-every", "0", *extra)) == 0
        runs[name] = metric_rows(out)
    for row in runs["bf16"]:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    held = [r["eval/loss"] for r in runs["bf16"] if "eval/loss" in r]
    assert held[-1] < held[0] - 0.01  # it trains
    first_fp32, first_bf16 = (next(r for r in runs[n] if "loss" in r) for n in ("fp32", "bf16"))
    for key in ("logps/chosen", "logps/rejected"):
        relative = abs(first_bf16[key] - first_fp32[key]) / abs(first_fp32[key])
        assert relative < BF16_RTOL, (key, relative)
    assert first_bf16["loss"] == pytest.approx(math.log(2), abs=1e-3)
