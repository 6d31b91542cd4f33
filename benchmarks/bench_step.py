"""Time the DPO step, mode by mode, on the workload of benchmarks/hh_smollm2.yaml.

Usage (from the repository root, with ../shared beside it)::

    python benchmarks/bench_step.py                      # every mode, 2 warm-up + 20 steps
    python benchmarks/bench_step.py --steps 5 --modes naive,preftune

Each mode runs in its own process (so peak RSS is that mode's alone) on the same batches in
file order. The modes are cumulative, so each row shows what one more optimization adds:

    naive            chosen and rejected in separate calls, full log-softmax, reference
                     forward every step (four forward passes per step)
    +concat          chosen and rejected stacked in one call per model
    +head_only       vocabulary head and log-softmax on response positions only, chunked
    +prefix_sharing  one row [prompt][chosen][rejected] per pair: the prompt runs once
    +packing         those rows end to end in one row, no padding; attention pair by pair
    +precompute_reference
                     reference log-probs computed once before training, by the policy
                     itself before its first update (no second copy of the weights)
    preftune         + AdamW's fused update, + gradient checkpointing (the default
                     configuration)

and one more row: ``preftune --no-gradient-checkpointing``, the default configuration
keeping every activation instead of recomputing each layer's in the backward pass (gradient
checkpointing is a memory switch: the cumulative rows above run without it).
``--merge`` keeps the rows of modes not run this time from the existing results.

Useful FLOPs count what a DPO step needs: the model body over each pair's tokens with the
prompt once (P + C + R), the vocabulary head over response tokens only (C + R), forward and
backward (x3) for the policy and forward (x1) for the reference; 2 FLOPs per multiply-add,
attention score FLOPs left out (under 5% at these lengths). The reference forward is
counted for every mode, so a mode that skips it per step is credited with the work it
avoided, as the cost of a step that still yields the full DPO update.
Results go to benchmarks/results/step_benchmark.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_STEPS = ("concat_forward", "head_only", "prefix_sharing", "packing", "precompute_reference",
          "fused_optimizer")
MODES = {
    name: {key: k < on for k, key in enumerate(_STEPS)} | {"gradient_checkpointing": False}
    for on, name in enumerate(
        ["naive", "+concat", "+head_only", "+prefix_sharing", "+packing",
         "+precompute_reference", "preftune"]
    )
}
# The default configuration recomputes activations in the backward pass (a memory switch,
# on by default as in TRL); the cumulative rows above keep every activation, so that each
# shows one optimization's effect on speed alone.
MODES["preftune --no-gradient-checkpointing"] = MODES["preftune"]
MODES["preftune"] = MODES["preftune"] | {"gradient_checkpointing": True}


def matmul_ceiling(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of a square matmul on this machine with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_mode(mode: str, config: str, warmup: int, steps: int) -> dict:
    """Child process: time ``warmup + steps`` optimizer steps in one mode."""
    import torch

    from preftune import models
    from preftune.config import build_config, read_yaml
    from preftune.data.pipeline import prepare_data
    from preftune.data.report import DataReport
    from preftune.reference import attach_reference_logps
    from preftune.train import make_optimizer, step_batches, train_step

    values = read_yaml(config)
    options = dict(MODES[mode])
    fused = options.pop("fused_optimizer")
    values.update(options)
    cfg = build_config(values)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = models.load(cfg.model, dtype=cfg.dtype)
    if cfg.gradient_checkpointing:
        from preftune.policy import enable_checkpointing

        enable_checkpointing(policy)
    # As in training: precomputed reference log-probs are the policy's own before its first
    # update, so no copy is made; otherwise the reference is a frozen copy.
    reference = policy if cfg.precompute_reference else models.frozen_copy(policy)
    pairs, _ = prepare_data(cfg, tokenizer, DataReport())
    pad_id = tokenizer.pad_token_id
    used = sorted(
        {i for s in range(warmup + steps) for m in step_batches(cfg, len(pairs), s) for i in m}
    )
    precompute_seconds = None
    if cfg.precompute_reference:
        start = time.perf_counter()
        (with_ref,) = attach_reference_logps(
            reference,
            [[pairs[i] for i in used]],
            pad_id,
            2 * cfg.batch_size,
            cfg.step_options(),
            use_cache=False,
        )
        precompute_seconds = time.perf_counter() - start
        for i, pair in zip(used, with_ref):
            pairs[i] = pair
        reference = None
    optimizer = make_optimizer(cfg, list(policy.parameters()), fused=fused)
    policy.train()
    body = policy.get_decoder()
    n_body = sum(p.numel() for n, p in body.named_parameters() if "embed" not in n)
    n_head = policy.get_output_embeddings().weight.numel()
    times, tokens, flops, num_pairs = [], [], [], []
    for step in range(warmup + steps):
        batch = [pairs[i] for m in step_batches(cfg, len(pairs), step) for i in m]
        start = time.perf_counter()
        train_step(cfg, policy, reference, optimizer, pairs, step, pad_id, cfg.loss_params())
        elapsed = time.perf_counter() - start
        if step < warmup:
            continue
        times.append(elapsed)
        num_pairs.append(len(batch))
        tokens.append(sum(p.num_tokens for p in batch))
        flops.append(
            sum(
                8 * n_body * (len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids))
                + 8 * n_head * (len(p.chosen_ids) + len(p.rejected_ids))
                for p in batch
            )
        )
        print(f"{mode} step {step - warmup + 1}/{steps}: {elapsed:.2f} s", file=sys.stderr)
    total = sum(times)
    return {
        "mode": mode,
        "options": MODES[mode],
        "steps": steps,
        "median_step_seconds": statistics.median(times),
        "min_step_seconds": min(times),
        "pairs_per_second": sum(num_pairs) / total,
        "tokens_per_second": sum(tokens) / total,
        "useful_gflop_per_second": sum(flops) / total / 1e9,
        "useful_gflop_per_pair": sum(flops) / sum(num_pairs) / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "precompute_seconds": precompute_seconds,
        "precompute_pairs": len(used) if precompute_seconds is not None else None,
        "step_seconds": times,
    }


CEILING = "matmul_ceiling_gflops"


def markdown(results: list[dict], meta: dict) -> str:
    naive = next((r for r in results if r["mode"] == "naive"), None)
    lines = [
        (
            f"DPO step on {meta['workload']}; {meta['steps']} measured steps after "
            f"{meta['warmup']} warm-up, {meta['threads']} threads; % of ceiling is against the "
            "fp32 matmul ceiling measured in the same run as each row "
            f"({', '.join(sorted({f'{r[CEILING]:.0f}' for r in results}))} GFLOP/s)."
        ),
        "",
        (
            "| mode | median s/step | min s/step | pairs/s | tokens/s | useful GFLOP/s "
            "| % of ceiling | peak RSS GB | pairs/s vs naive |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # Over the whole run (pairs/s), so that long steps count as they do in training.
        speedup = r["pairs_per_second"] / naive["pairs_per_second"] if naive else float("nan")
        lines.append(
            f"| {r['mode']} | {r['median_step_seconds']:.2f} | {r['min_step_seconds']:.2f} "
            f"| {r['pairs_per_second']:.3f} | {r['tokens_per_second']:.0f} "
            f"| {r['useful_gflop_per_second']:.1f} "
            f"| {100 * r['useful_gflop_per_second'] / r[CEILING]:.0f}% "
            f"| {r['peak_rss_gb']:.2f} | {speedup:.2f}x |"
        )
    pre = next((r for r in results if r.get("precompute_seconds")), None)
    if pre:
        lines += [
            "",
            (
                f"One-time reference precompute ({pre['mode']}): "
                f"{pre['precompute_seconds']:.1f} s for {pre['precompute_pairs']} pairs "
                f"({pre['precompute_seconds'] / pre['precompute_pairs']:.2f} s/pair), paid "
                "once per dataset and reused from the disk cache by later runs."
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "hh_smollm2.yaml"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing results of the modes not run now")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.config, args.warmup, args.steps)))
        return 0
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    from preftune.config import read_yaml

    threads = read_yaml(args.config).get("threads", 2)
    ceiling = matmul_ceiling(threads)
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s", file=sys.stderr)
    results = []
    for mode in modes:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            env={**os.environ},
        )
        results.append(json.loads(child.stdout.strip().splitlines()[-1]) | {CEILING: ceiling})
    out = Path(args.out)
    if args.merge and (out / "step_benchmark.json").exists():
        earlier = json.loads((out / "step_benchmark.json").read_text())
        ran = {r["mode"]: r for r in results}
        kept = [{CEILING: earlier["meta"][CEILING]} | r for r in earlier["results"]]
        results = [ran.pop(r["mode"], r) for r in kept] + list(ran.values())
    meta = {
        "workload": "SmolLM2-135M-Instruct, first 256 HH harmless-base test pairs, "
        "batch 4 pairs, max length 512, fp32",
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": threads,
        "matmul_ceiling_gflops": ceiling,
        "date": time.strftime("%Y-%m-%d"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_benchmark.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    table = markdown(results, meta)
    (out / "step_benchmark.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
