"""The scaling checks that need CUDA: bf16, LoRA and DDP on GPUs, with their throughput.

Usage (from the repository root, on a machine with one or more CUDA GPUs)::

    python benchmarks/gpu_check.py                  # about 5 minutes on one GPU
    python benchmarks/gpu_check.py --steps 20 --model PATH

Without a CUDA device it prints "no CUDA device: skipped" and exits 0. ``--device cpu``
runs the same checks on CPU (DDP over gloo), to try the script itself on a small model.

Every check is one ``preftune train`` run on the embedded SmolLM2-135M-Instruct (or
``--model``), the first 64 demo pairs, max length 256, ``--device cuda``:

    fp32         float32, 4 pairs per step: the baseline the others are compared with
    bf16         --dtype bfloat16: finite metrics, first-step log-probs within bf16 of fp32
    autocast     --autocast: the same checks
    lora         --lora: starts at ln 2, trains, finite metrics
    ddp          (2+ GPUs) --num-processes 2 with 2 pairs each against fp32's 4 pairs:
                 same loss and metrics (GPU kernels are not bitwise repeatable, so 1e-4)

Throughput is the mean of ``tokens_per_second`` and ``pairs_per_second`` over the steps after
the first (which includes CUDA warm-up). Results go to benchmarks/results/gpu_check.json;
the exit status is 0 when every check that ran passed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BF16_RTOL = 2e-2  # bfloat16 keeps 8 mantissa bits
DDP_RTOL = 1e-4
CHECKED_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def run(args, name: str, flags: list[str], out: Path) -> dict:
    command = [
        sys.executable, "-m", "preftune", "train", "--model", args.model, "--data", "demo",
        "--limit", "64", "--max-eval-pairs", "16", "--max-length", "256",
        "--max-steps", str(args.steps), "--lr", "1e-5", "--num-samples", "0",
        "--save-every", "0", "--eval-every", "0", "--no-progress", "--device", args.device,
        "--output", str(out / name), *flags,
    ]
    started = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    result = {"name": name, "flags": flags, "wall_seconds": round(time.time() - started, 1),
              "exit_status": proc.returncode}
    if proc.returncode != 0:
        result["error"] = (proc.stdout + proc.stderr)[-3000:]
        return result
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    timed = train[1:] or train
    result.update(
        rows=train,
        all_finite=all(math.isfinite(v) for r in rows for v in r.values()
                       if isinstance(v, float)),
        tokens_per_second=statistics.fmean(r["tokens_per_second"] for r in timed),
        pairs_per_second=statistics.fmean(r["pairs_per_second"] for r in timed),
        first_loss=train[0]["loss"],
        eval_loss=[r["eval/loss"] for r in rows if "eval/loss" in r],
    )
    return result


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check(results: dict[str, dict], gpus: int) -> list[dict]:
    """Pass or fail, with the measured numbers, for each check that ran."""
    base = results["fp32"]
    verdicts = []
    for name, result in results.items():
        verdict = {"check": name, "passed": result["exit_status"] == 0}
        if not verdict["passed"]:
            verdict["why"] = "the run failed (see runs[].error)"
            verdicts.append(verdict)
            continue
        verdict["passed"] = result["all_finite"]
        first = result["rows"][0]
        if name in ("bf16", "autocast"):
            errors = {k: relative(first[k], base["rows"][0][k])
                      for k in ("logps/chosen", "logps/rejected")}
            verdict["first_step_logps_relative_error"] = errors
            verdict["passed"] &= max(errors.values()) < BF16_RTOL
        if name == "lora":
            verdict["first_loss_minus_ln2"] = result["first_loss"] - math.log(2)
            verdict["eval_loss_first_last"] = [result["eval_loss"][0], result["eval_loss"][-1]]
            verdict["passed"] &= abs(verdict["first_loss_minus_ln2"]) < 1e-5
            verdict["passed"] &= result["eval_loss"][-1] < result["eval_loss"][0]
        if name == "ddp":
            worst = max(relative(a[k], b[k]) for a, b in zip(result["rows"], base["rows"])
                        for k in CHECKED_KEYS if abs(b[k]) > 1e-6)
            verdict["max_relative_difference_from_fp32"] = worst
            verdict["passed"] &= worst < DDP_RTOL
        verdicts.append(verdict)
    if gpus < 2:
        verdicts.append({"check": "ddp", "passed": None,
                         "why": f"skipped: needs 2 GPUs, this machine has {gpus}"})
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped (bf16, LoRA and DDP checks on GPUs need one)")
        return 0

    gpus = torch.cuda.device_count() if args.device == "cuda" else 2  # gloo: 2 processes
    configs = {
        "fp32": ["--batch-size", "4"],
        "bf16": ["--batch-size", "4", "--dtype", "bfloat16"],
        "autocast": ["--batch-size", "4", "--autocast"],
        "lora": ["--batch-size", "4", "--lora", "--lr", "1e-4"],
    }
    if gpus >= 2:
        configs["ddp"] = ["--batch-size", "2", "--num-processes", "2"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in configs.items():
            results[name] = run(args, name, flags, Path(tmp))
            r = results[name]
            print(f"{name:9s} exit {r['exit_status']}  "
                  f"{r.get('tokens_per_second', float('nan')):8.0f} tok/s  "
                  f"{r.get('pairs_per_second', float('nan')):6.2f} pairs/s  "
                  f"({r['wall_seconds']} s)")
    verdicts = check(results, gpus)
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "gpus": gpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "steps": args.steps,
        "checks": verdicts,
        "runs": list(results.values()),
    }
    out = ROOT / "benchmarks" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for verdict in verdicts:
        state = {True: "pass", False: "FAIL", None: "skip"}[verdict["passed"]]
        print(f"{state:5s} {verdict['check']}")
    print(f"written to {out}")
    return 0 if all(v["passed"] is not False for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
