"""Peak resident memory of a few training steps: full fine-tuning against LoRA.

Usage (from the repository root)::

    python benchmarks/lora_memory.py                 # the embedded SmolLM2-135M-Instruct
    python benchmarks/lora_memory.py --steps 3 --model PATH

Each configuration is one ``preftune train`` process on the first 16 demo pairs (batches of
2, max length 256, no samples, a checkpoint only at the end), and its peak RSS is read from
the kernel's accounting of that process alone (``wait4``). A process that loads the model
and reads every weight gives the floor; what a run adds on top of it is its own.

Full fine-tuning adds a frozen copy of the weights as the reference (freed once the
reference log-probs are precomputed, kept with ``--no-precompute-reference``), a gradient
and two AdamW moments per weight, and the activations of the backward pass. LoRA adds the
activations and a few adapter weights with their gradients and moments; its reference is
the same model with the adapter off, so the base weights exist once. Gradient checkpointing
(the default) shrinks the activations, which leaves what each mode holds besides them; the
rows without it show what it saves.
Results go to benchmarks/results/lora_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Gradient checkpointing is on by default; the rows without it say so.
CONFIGS = {
    "full fine-tune": [],
    "full fine-tune, reference kept": ["--no-precompute-reference"],
    "LoRA r=16": ["--lora"],
    "LoRA r=16, reference kept": ["--lora", "--no-precompute-reference"],
    "full fine-tune, no gradient checkpointing": ["--no-gradient-checkpointing"],
    "LoRA r=16, no gradient checkpointing": ["--lora", "--no-gradient-checkpointing"],
}


def peak_rss_mb(command: list[str]) -> tuple[float, float, int]:
    """Run ``command``; return its peak RSS in MiB, wall seconds and exit status."""
    started = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read()[-3000:])
    return usage.ru_maxrss / 1024, time.time() - started, proc.returncode  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from preftune import models

    model, _ = models.load(args.model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    rows = []
    # The floor: a process that loads the model and reads every weight, nothing more.
    script = ("import sys; from preftune import models; m = models.load(sys.argv[1])[0]; "
              "print(sum(float(p.sum()) for p in m.parameters()))")
    load_only = [sys.executable, "-c", script, args.model]
    rss, seconds, code = peak_rss_mb(load_only)
    rows.append({"config": "load the model, read every weight", "flags": [],
                 "peak_rss_mib": round(rss, 1), "wall_seconds": round(seconds, 1),
                 "exit_status": code})
    print(f"{'load the model, read every weight':40s} peak RSS {rss:8.1f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in CONFIGS.items():
            command = [
                sys.executable, "-m", "preftune", "train", "--model", args.model,
                "--data", "demo", "--limit", "16", "--max-eval-pairs", "4",
                "--max-steps", str(args.steps), "--batch-size", "2", "--max-length", "256",
                "--num-samples", "0", "--save-every", "0", "--eval-every", "0",
                "--no-progress", "--threads", str(args.threads),
                "--output", str(Path(tmp) / name.replace(" ", "_").replace(",", "")), *flags,
            ]
            rss, seconds, code = peak_rss_mb(command)
            rows.append({"config": name, "flags": flags, "peak_rss_mib": round(rss, 1),
                         "wall_seconds": round(seconds, 1), "exit_status": code})
            print(f"{name:40s} peak RSS {rss:8.1f} MiB  ({seconds:.0f} s, exit {code})")
    result = {"model": args.model, "weights_mib": round(weights_mb, 1), "steps": args.steps,
              "threads": args.threads, "runs": rows}
    out = ROOT / "benchmarks" / "results" / "lora_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"weights {weights_mb:.1f} MiB; written to {out}")
    return 0 if all(r["exit_status"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
