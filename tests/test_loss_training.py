"""Every registered loss trains the embedded model: the policy changes, metrics stay finite.

These runs use the real SmolLM2-135M-Instruct on a few demo pairs with short sequences, so
that each loss is exercised on the model users start from, not only on a random toy.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from preftune.config import TrainConfig
from preftune.losses import LOSSES
from preftune.train import train

# SimPO and ORPO scale per-token log-probs, which move far less than sums: their papers use
# a much larger beta than DPO.
BETAS = {"simpo": 2.0, "orpo": 1.0}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _short_run(tmp_path, loss: str, **overrides):
    cfg = TrainConfig(
        model="smollm2-135m-instruct", data="demo", limit=4, max_eval_pairs=2, max_steps=2,
        batch_size=2, max_length=96, lr=2e-5, warmup_ratio=0.0, scheduler="constant",
        loss=loss, beta=BETAS.get(loss, 0.1), num_samples=0, eval_every=0, progress=False,
        output=str(tmp_path / loss), **overrides,
    )
    return train(cfg).run_dir


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_changes_the_policy_with_finite_metrics(tmp_path, loss, smollm_folder):
    run_dir = _short_run(tmp_path, loss)
    rows = _rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    trained = load_file(run_dir / "model" / "model.safetensors")
    original = load_file(smollm_folder / "model.safetensors")
    moved = max((trained[k] - original[k]).abs().max().item() for k in original)
    assert moved > 0


@pytest.mark.slow
def test_reference_free_run_lowers_both_logps(tmp_path):
    """Without the anchor, pushing the rejected response down drags the chosen one along.

    Both held-out sequence log-probs end below where they started: the collapse the
    reference model exists to prevent.
    """
    run_dir = _short_run(tmp_path, "ref_free", max_steps=6, lr=5e-5)
    evals = [r for r in _rows(run_dir) if "eval/loss" in r]
    first, last = evals[0], evals[-1]
    assert last["eval/logps/chosen"] < first["eval/logps/chosen"]
    assert last["eval/logps/rejected"] < first["eval/logps/rejected"]
    assert last["eval/rewards/margins"] > first["eval/rewards/margins"]
