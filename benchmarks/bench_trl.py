"""Time Hugging Face TRL's DPOTrainer on the workload of benchmarks/hh_smollm2.yaml.

TRL is not a preftune dependency: run this with the interpreter of a separate environment
that has TRL installed and preftune not (see benchmarks/README.md)::

    /work/trl-venv/bin/python benchmarks/bench_trl.py --model PATH
    /work/trl-venv/bin/python benchmarks/bench_trl.py --model PATH --steps 2 --warmup 0

PATH is a folder with the model in Hugging Face format (config, safetensors, tokenizer); for
the benchmark it is preftune's dequantized copy of SmolLM2-135M-Instruct, printed by
``python -c "from preftune import models; print(models.dequantized_copy(models.resolve('smollm2-135m-instruct')))"``
in preftune's own environment.

The workload is the one benchmarks/bench_step.py times: the first 256 usable pairs of the HH
harmless-base test file in file order, as plain text (prompt up to and including the last
"\\n\\nAssistant:" the two transcripts share, responses with their leading space), batches of
4 pairs in file order (pairs 0-3, 4-7, ...), max length 512, fp32, 2 threads, beta 0.1,
sigmoid loss, learning rate 1e-6 held constant. Everything else is left at TRL's defaults,
among them gradient checkpointing (on), the reference model (a second copy of the policy,
loaded from the same folder) and TRL's own tokenization and truncation.

Each optimizer step is timed from the trainer's step-begin to its step-end callback: forward
and backward of the policy, forward of the reference model, gradient clipping, the optimizer
and scheduler steps. Fetching and collating the next batch, and logging, fall outside that
window. The warm-up steps are run but not counted.

Results go to benchmarks/results/trl_dpo.json; a markdown row in the column layout of
bench_step.py's table is printed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Everything is read from local files: keep the Hugging Face libraries off the network, and
# their usage pings off.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
              "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_name] = "1"

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-harmless-test.jsonl.gz"

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"
CRLF_ASSISTANT_MARKER = "\r\n\r\nAssistant:"

# What the workload fixes (benchmarks/hh_smollm2.yaml).
BETA = 0.1
BATCH_PAIRS = 4
MAX_LENGTH = 512
THREADS = 2
LEARNING_RATE = 1e-6


# Data: the same pairs preftune reads


def hh_split(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen_response, rejected_response)`` of two HH transcripts, or None.

    The prompt ends right after the last "\\n\\nAssistant:" lying wholly inside the text both
    transcripts share; the responses are what follows, leading space included. None when
    the pair is unusable by preftune's rules: identical transcripts, no assistant marker, a
    difference before the final assistant turn, or a response that is empty or blank.
    """
    if chosen == rejected:
        return None
    if ASSISTANT_MARKER not in chosen and ASSISTANT_MARKER not in rejected:
        return None
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    marker = chosen.rfind(ASSISTANT_MARKER, 0, shared)
    if marker < 0:
        return None
    cut = marker + len(ASSISTANT_MARKER)
    prompt, good, bad = chosen[:cut], chosen[cut:], rejected[cut:]
    if HUMAN_MARKER in good or HUMAN_MARKER in bad:
        return None
    if not good.strip() or not bad.strip():
        return None
    return prompt, good, bad


def read_pairs(path: Path, limit: int) -> tuple[list[dict], list[int], int]:
    """The first ``limit`` usable pairs of an HH JSON Lines file (optionally gzipped).

    Returns the pairs as ``{"prompt", "chosen", "rejected"}`` dicts in file order, the
    1-based line number of each, and the number of records skipped on the way.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    pairs: list[dict] = []
    lines: list[int] = []
    skipped = 0
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError:  # bad UTF-8 or bad JSON
                skipped += 1
                continue
            chosen = record.get("chosen") if isinstance(record, dict) else None
            rejected = record.get("rejected") if isinstance(record, dict) else None
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                skipped += 1
                continue
            if CRLF_ASSISTANT_MARKER in chosen or CRLF_ASSISTANT_MARKER in rejected:
                chosen, rejected = chosen.replace("\r\n", "\n"), rejected.replace("\r\n", "\n")
            split = hh_split(chosen, rejected)
            if split is None:
                skipped += 1
                continue
            pairs.append(dict(zip(("prompt", "chosen", "rejected"), split)))
            lines.append(number)
            if len(pairs) >= limit:
                break
    return pairs, lines, skipped


# The trainer and its instrumentation


def build_trainer_class():
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    class FileOrderDPOTrainer(DPOTrainer):
        """DPOTrainer that takes the pairs in dataset order instead of shuffling them."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

    return FileOrderDPOTrainer


class BatchRecorder:
    """Wraps the trainer's collator and keeps, for each batch built, what it held."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[dict] = []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.batches.append({
            "prompt_ids": [list(e["prompt_ids"]) for e in examples],
            "tokens": int(batch["attention_mask"].sum()),
            "rows": int(batch["input_ids"].shape[0]),
            "width": int(batch["input_ids"].shape[1]),
        })
        return batch


def step_timer(threads: int):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock seconds of every optimizer step, from step begin to step end."""

        def __init__(self):
            self.seconds: list[float] = []
            self.threads_seen: int | None = None
            self._start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            torch.set_num_threads(threads)  # in case anything on the way changed it
            self.threads_seen = torch.get_num_threads()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)
            print(f"trl step {len(self.seconds)}: {self.seconds[-1]:.2f} s", file=sys.stderr,
                  flush=True)

    return StepTimer()


def run(args: argparse.Namespace) -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    from trl import DPOConfig

    torch.set_num_threads(THREADS)
    pairs, lines, skipped = read_pairs(Path(args.data), args.limit)
    print(f"{len(pairs)} pairs from {args.data} (first at line {lines[0]}, last at line "
          f"{lines[-1]}, {skipped} records skipped)", file=sys.stderr)
    dataset = datasets.Dataset.from_list(pairs)
    total = args.warmup + args.steps

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as scratch:
        config = DPOConfig(
            output_dir=scratch,  # nothing is saved; the trainer still wants a folder
            model_init_kwargs={"dtype": "float32"},
            beta=BETA,
            loss_type=["sigmoid"],
            per_device_train_batch_size=BATCH_PAIRS,
            gradient_accumulation_steps=1,
            max_length=MAX_LENGTH,
            bf16=False,
            fp16=False,
            use_cpu=True,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_steps=total,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            # TRL checkpoints activations by default; transformers 5 calls the switch
            # activation_checkpointing (gradient_checkpointing is its deprecated alias).
            **({"activation_checkpointing": False} if args.no_gradient_checkpointing else {}),
        )
        timer = step_timer(THREADS)
        trainer = build_trainer_class()(
            model=args.model, args=config, train_dataset=dataset, callbacks=[timer]
        )
        recorder = BatchRecorder(trainer.data_collator)
        trainer.data_collator = recorder

        # TRL drops pairs whose prompt alone fills max_length; then the batches would no
        # longer be preftune's, so say so.
        kept = list(trainer.train_dataset["prompt"])
        consumed = total * BATCH_PAIRS
        dropped = []  # indices into `pairs`
        if len(kept) != len(pairs):
            kept_set = set(kept)
            dropped = [i for i, pair in enumerate(pairs) if pair["prompt"] not in kept_set]
            print(f"note: TRL drops {len(dropped)} pair(s) whose prompt alone fills max_length "
                  f"(pairs {dropped}, file lines {[lines[i] for i in dropped]}); from there on "
                  f"its batches are shifted against preftune's. This run uses pairs 0-"
                  f"{consumed - 1}.", file=sys.stderr)
        # TRL truncates each sequence on its own, keeping its start (the response loses its
        # end); preftune shortens the prompt instead. Count the pairs of this run it touches.
        truncated = sum(
            1 for row in trainer.train_dataset.select(range(min(len(kept), consumed)))
            if len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
            > MAX_LENGTH
        )

        trainer.train()

        policy = trainer.model
        reference = trainer.ref_model
        checks = {
            "train_sampler": type(trainer._get_train_sampler()).__name__,
            "policy_dtype": str(policy.dtype),
            "reference_dtype": str(reference.dtype) if reference is not None else None,
            "reference_is_separate_model": reference is not None and reference is not policy,
            "device": str(trainer.args.device),
            "torch_threads": timer.threads_seen,
            "optimizer": type(trainer.optimizer.optimizer
                              if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__,
            "optim_setting": str(trainer.args.optim),
            "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
            "max_grad_norm": trainer.args.max_grad_norm,
            "weight_decay": trainer.args.weight_decay,
        }

    batches = recorder.batches[:len(timer.seconds)]
    # Batch k must hold dataset rows 4k .. 4k+3 (wrapping at the end of the dataset).
    rows = list(trainer.train_dataset["prompt_ids"])
    in_order = all(
        batch["prompt_ids"] == [rows[(k * BATCH_PAIRS + j) % len(rows)]
                                for j in range(len(batch["prompt_ids"]))]
        for k, batch in enumerate(batches)
    )
    checks["batches_in_file_order"] = in_order
    # ... and they are preftune's batches if, besides, no pair before them was dropped.
    checks["batches_match_preftune"] = in_order and not any(i < consumed for i in dropped)
    if not checks["batches_match_preftune"]:
        print("warning: the batches are not preftune's (pairs 0-3, 4-7, ... in file order)",
              file=sys.stderr)

    times = timer.seconds[args.warmup:]
    measured = batches[args.warmup:]
    num_pairs = [b["rows"] // 2 for b in measured]
    tokens = [b["tokens"] for b in measured]
    elapsed = sum(times)
    return {
        "mode": "trl" if not args.no_gradient_checkpointing else "trl (no grad. ckpt.)",
        "steps": len(times),
        "warmup": args.warmup,
        "median_step_seconds": statistics.median(times),
        "min_step_seconds": min(times),
        "pairs_per_second": sum(num_pairs) / elapsed,
        "tokens_per_second": sum(tokens) / elapsed,
        "useful_gflop_per_second": None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "step_seconds": times,
        "step_pairs": num_pairs,
        "step_tokens": tokens,
        "step_padded_shape": [[b["rows"], b["width"]] for b in measured],
        "warmup_step_seconds": timer.seconds[:args.warmup],
        "data": {
            "file": str(args.data),
            "pairs_read": len(pairs),
            "records_skipped": skipped,
            "pairs_dropped_by_trl": [{"pair": i, "line": lines[i]} for i in dropped],
            "pairs_in_run_over_max_length": truncated,
        },
        "checks": checks,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "python": sys.version.split()[0],
        },
    }


def markdown_row(r: dict) -> str:
    """One row in the column layout of bench_step.py's table."""
    return (
        f"| {r['mode']} | {r['median_step_seconds']:.2f} | {r['min_step_seconds']:.2f} "
        f"| {r['pairs_per_second']:.3f} | {r['tokens_per_second']:.0f} | n/a | n/a "
        f"| {r['peak_rss_gb']:.2f} | n/a |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="folder with the model in Hugging Face format (and its tokenizer)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="HH JSON Lines file (.gz)")
    parser.add_argument("--limit", type=int, default=256, help="usable pairs to read")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="turn off TRL's default gradient checkpointing (not the default "
                             "benchmark; preftune does not checkpoint)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a folder with a config.json")
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: file not found")

    result = run(args)
    meta = {
        "workload": "SmolLM2-135M-Instruct, first 256 HH harmless-base test pairs, "
                    "batch 4 pairs, max length 512, fp32",
        "model": str(args.model),
        "threads": THREADS,
        "beta": BETA,
        "learning_rate": LEARNING_RATE,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl_dpo.json").write_text(json.dumps({"meta": meta, "results": [result]}, indent=2))
    print("| mode | median s/step | min s/step | pairs/s | tokens/s | useful GFLOP/s "
          "| % of ceiling | peak RSS GB | speed-up vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(markdown_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
