"""How far bfloat16 moves the log-probs DPO is computed from, and a short bfloat16 run.

Usage (from the repository root)::

    python benchmarks/bf16_check.py                 # the embedded SmolLM2-135M-Instruct

Part one scores the first 16 demo pairs (max length 256) with the model in float32, with
its weights in bfloat16 (``--dtype bfloat16``) and with float32 weights under bfloat16
autocast (``--autocast``), through the same code as a training step, and reports the
relative error of each sequence log-prob against float32 (a run's first step starts from
those log-probs; its loss is ln 2 in any dtype, the reference being the same model).
Part two trains 4 steps with each of the two options and checks every metric is finite.
Results go to benchmarks/results/bf16_check.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def score(model_spec: str, dtype: str, autocast: bool, limit: int) -> torch.Tensor:
    """Policy log-probs of chosen then rejected responses, as a training step computes them."""
    from preftune import models
    from preftune.config import TrainConfig
    from preftune.data.pipeline import prepare_data
    from preftune.data.report import DataReport
    from preftune.forward import layout, model_logps

    cfg = TrainConfig(model=model_spec, data="demo", limit=limit, max_length=256, dtype=dtype,
                      autocast=autocast, batch_size=4)
    policy, tokenizer = models.load(model_spec, dtype=dtype)
    pairs, _ = prepare_data(cfg, tokenizer, DataReport())
    options = cfg.step_options()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[start : start + cfg.batch_size]
            out.append(model_logps(policy.eval(), layout(policy, chunk, tokenizer.pad_token_id,
                                                         options), options))
    return torch.cat(out)  # (2 * pairs,)


def short_run(model_spec: str, flags: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "preftune", "train", "--model", model_spec, "--data",
                   "demo", "--limit", "32", "--max-eval-pairs", "8", "--max-steps", str(steps),
                   "--batch-size", "4", "--max-length", "256", "--lr", "2e-5",
                   "--num-samples", "0", "--save-every", "0", "--eval-every", "0",
                   "--no-progress", "--output", str(Path(tmp) / "run"), *flags]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"flags": flags, "exit_status": proc.returncode, "error": proc.stderr[-2000:]}
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().split("\n")
                if x]
    numbers = [v for row in rows for k, v in row.items() if isinstance(v, float)]
    train = [r for r in rows if "loss" in r]
    held = [r["eval/loss"] for r in rows if "eval/loss" in r]
    return {"flags": flags, "exit_status": 0, "all_finite": all(map(math.isfinite, numbers)),
            "train_loss": [round(r["loss"], 5) for r in train],
            "eval_loss_first_last": [round(held[0], 5), round(held[-1], 5)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    exact = score(args.model, "float32", False, args.pairs)
    result = {"model": args.model, "pairs": args.pairs, "logps": {}, "runs": []}
    for name, dtype, autocast in (("bfloat16 weights", "bfloat16", False),
                                  ("float32 weights, bfloat16 autocast", "float32", True)):
        approx = score(args.model, dtype, autocast, args.pairs)
        relative = (approx - exact).abs() / exact.abs()
        result["logps"][name] = {
            "relative_error_max": float(relative.max()),
            "relative_error_mean": float(relative.mean()),
            "absolute_error_max_nats": float((approx - exact).abs().max()),
            "logps_dtype": str(approx.dtype),
        }
        print(f"{name:36s} log-prob relative error: max {float(relative.max()):.2e}, "
              f"mean {float(relative.mean()):.2e}; absolute max "
              f"{float((approx - exact).abs().max()):.3f} nats")
    for flags in (["--dtype", "bfloat16"], ["--autocast"]):
        run = short_run(args.model, flags, args.steps)
        result["runs"].append(run)
        print(" ".join(flags), run)
    out = ROOT / "benchmarks" / "results" / "bf16_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0 if all(r.get("all_finite") for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
