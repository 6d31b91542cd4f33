"""The training loop: DPO (or a loss of its family) on preference pairs.

One optimizer step reads ``batch_size * grad_accum * num_processes`` pairs from a seeded
stream of pair indices (a new permutation each epoch), runs the policy over chosen and
rejected stacked together and the frozen reference without gradients, and averages the
per-pair loss over every pair of the step, so that accumulating N micro-batches of k pairs
gives the same update as one batch of N * k pairs, and so does spreading each micro-batch
over processes (:mod:`preftune.distributed`).

With ``--lora`` the policy is the model with LoRA adapters and the reference is the same
model with its adapter off (:mod:`preftune.lora`); otherwise the reference is a frozen copy
of the policy as loaded.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_scheduler

from preftune import distributed, faults, lora
from preftune.checkpoint import Checkpoints
from preftune.config import TrainConfig
from preftune.data.pipeline import prepare_data
from preftune.data.report import DataReport
from preftune.data.tokenize import TokenizedPair
from preftune.distributed import Engine
from preftune.evaluate import evaluate
from preftune.forward import layout, pair_forward
from preftune.logps import head_only_is_exact
from preftune.losses import LOSSES
from preftune.metrics import MetricsLog, NoLog, add_sums, averages, console_line
from preftune.policy import load_policy, reference_for, save_policy, trainable_parameters
from preftune.reference import attach_reference_logps
from preftune.rundir import RunDir
from preftune.samples import generate, sample_rewards
from preftune.validate import problem_lines

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]


@functools.lru_cache(maxsize=4)
def pair_order(num_pairs: int, seed: int, epoch: int, shuffle: bool,
               lengths: tuple[int, ...] | None = None, batch_size: int = 1) -> tuple[int, ...]:
    """The order of pair indices in one epoch; seeded so a run can be repeated exactly.

    With ``lengths``, pairs of similar length are batched together: each window of 64
    micro-batches of the shuffled order is sorted by length and cut into micro-batches, and
    the micro-batches are shuffled. An epoch still holds every pair exactly once.
    """
    if not shuffle:
        return tuple(range(num_pairs))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator).tolist()
    if lengths is None:
        return tuple(order)
    window = 64 * batch_size
    micro_batches = []
    for start in range(0, num_pairs, window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        micro_batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(micro_batches), generator=generator).tolist()
    return tuple(i for k in shuffled for i in micro_batches[k])


def step_batches(cfg: TrainConfig, num_pairs: int, step: int,
                 lengths: tuple[int, ...] | None = None,
                 world_size: int = 1) -> list[list[int]]:
    """Pair indices of each micro-batch of optimizer step ``step`` (0-based), all processes.

    A micro-batch holds ``batch_size * world_size`` pairs; each process takes its slice
    (``Engine.slice``), so the stream is the one a single process with ``world_size`` times
    the batch size reads.
    """
    micro = cfg.batch_size * world_size
    per_step = micro * cfg.grad_accum
    grouped = lengths if cfg.group_by_length else None
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_pairs)
        order = pair_order(num_pairs, cfg.seed, epoch, cfg.shuffle, grouped, micro)
        indices.append(order[offset])
    return [indices[i : i + micro] for i in range(0, per_step, micro)]


def batch_indices(cfg: TrainConfig, pairs: list[TokenizedPair], step: int,
                  world_size: int = 1) -> list[list[int]]:
    """Indices into ``pairs`` of each micro-batch of optimizer step ``step`` (0-based)."""
    lengths = tuple(p.num_tokens for p in pairs) if cfg.group_by_length else None
    return step_batches(cfg, len(pairs), step, lengths, world_size)


def pairs_per_step(cfg: TrainConfig) -> int:
    return cfg.batch_size * cfg.grad_accum * cfg.num_processes


def pairs_read(cfg: TrainConfig, pairs: list[TokenizedPair], steps: int,
               world_size: int = 1) -> list[int]:
    """Indices of the pairs that ``steps`` optimizer steps read, ascending: all of them
    unless the run ends within its first epoch."""
    if steps * cfg.batch_size * cfg.grad_accum * world_size >= len(pairs):
        return list(range(len(pairs)))
    return sorted({i for step in range(steps)
                   for batch in batch_indices(cfg, pairs, step, world_size) for i in batch})


def total_steps(cfg: TrainConfig, num_pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_pairs / pairs_per_step(cfg)))


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as configured and return where the run was written."""
    started = time.time()
    faults.preflight(cfg)  # a missing model or data file fails before anything is written
    engine = distributed.start(cfg)  # one process, or this process's part of a launched job
    # Process 0 creates (or reopens) the run directory; the others use the one it chose.
    run = RunDir(Path(engine.on_main(lambda: str(_run_dir(cfg).path))))
    cfg.output = str(run.path)
    # On --resume: the newest complete checkpoint, and a refusal if the config changed.
    checkpoints = Checkpoints(run.path, cfg, writer=engine.is_main)
    if engine.is_main:
        cfg.save(run.path / "config.yaml")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    params = cfg.loss_params()
    needs_reference = LOSSES[params.loss].needs_reference

    # Models: the policy, and the reference, which is the policy as loaded. Reference
    # log-probs precomputed before the first update are the policy's own, so no copy is
    # made; otherwise the reference is a frozen copy (for LoRA, the policy itself with its
    # adapter off). Either way the weights are held once during training.
    policy, tokenizer = load_policy(cfg, engine)
    self_reference = (needs_reference and cfg.precompute_reference and not engine.sharded
                      and not lora.is_lora(policy))
    reference = reference_for(policy) if needs_reference and not self_reference else None
    pad_id = tokenizer.pad_token_id

    # Data: every dropped or altered record goes to data_report.json.
    report = DataReport()
    try:
        train_pairs, eval_pairs = prepare_data(cfg, tokenizer, report)
    finally:
        if engine.is_main:
            report.write(run.path / "data_report.json")
    log.info("data: %s", report.summary())
    for line in problem_lines(report, limit=10):
        log.info("  %s", line)
    if report.entries:
        log.info("  every record dropped or altered is listed in %s", run.path / "data_report.json")
    # Each layout's self-check, once per model before an engine wraps it, also on the run's
    # two longest pairs: attention that changes with length must show it there.
    longest = sorted(train_pairs, key=lambda p: p.num_tokens)[-2:]
    for model in (policy, reference) if reference is not None else (policy,):
        head_only_is_exact(model)
        layout(model, longest, pad_id, cfg.step_options())
    if reference is not None:
        reference = engine.prepare_reference(reference)
    steps = total_steps(cfg, len(train_pairs))
    if needs_reference and cfg.precompute_reference:
        # One reference pass (or a cache hit) now, over the training pairs the run reads:
        # all of them, unless --max-steps ends it within the first epoch. The reference is
        # then freed until the end.
        read = pairs_read(cfg, train_pairs, steps, engine.world_size)
        read_pairs, eval_pairs = attach_reference_logps(
            policy if self_reference else reference,
            [[train_pairs[i] for i in read], eval_pairs], pad_id, 2 * cfg.batch_size,
            cfg.step_options(), progress=cfg.progress and engine.is_main, engine=engine,
        )
        train_pairs = list(train_pairs)
        for i, pair in zip(read, read_pairs):
            train_pairs[i] = pair
        reference = None
    sample_pairs = _sample_pairs(cfg, engine, eval_pairs)
    before = [generate(policy, tokenizer, p.prompt_ids, cfg.sample_max_new_tokens)
              for p in sample_pairs]

    optimizer = engine.prepare(policy, make_optimizer(cfg, trainable_parameters(policy),
                                                      fused=not engine.sharded))
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * steps),
        num_training_steps=steps,
    )
    # Resume: weights, optimizer, schedule, random states and logs as of the checkpoint.
    state = checkpoints.restore(policy, optimizer, scheduler, train_pairs, steps)
    metrics_log = MetricsLog(run.path) if engine.is_main else NoLog()
    if engine.sharded:
        # TODO: save sharded weights and optimizer state; until then such runs cannot resume.
        log.warning("no checkpoints under %s: the run cannot be resumed", engine.name)
    progress = _progress(cfg, steps, state.step, engine.is_main)
    policy.train()
    eval_result = None
    guard = faults.NanGuard(cfg.on_nan, checkpoints, state.skipped_batches)
    hooks = faults.TestHooks.from_env(policy)
    stop = faults.StopSignals().install()  # Ctrl-C or SIGTERM: finish the step, save, stop
    try:
        if eval_pairs and state.step == 0:
            # Step 0: where every held-out pair starts on the loss curve.
            eval_result = _evaluate_and_log(cfg, run.path, metrics_log, progress, policy,
                                            reference, eval_pairs, params, pad_id, 0, steps,
                                            engine)
        for step in range(state.step, steps):
            hooks.before_step(step + 1)
            values = train_step(cfg, policy, reference, optimizer, train_pairs, step, pad_id,
                                params, engine)
            scheduler.step()
            guard.check(step + 1, values, lambda: [
                train_pairs[i] for batch in batch_indices(cfg, train_pairs, step,
                                                          engine.world_size) for i in batch])
            is_last = step + 1 == steps
            if (step + 1) % cfg.log_every == 0 or is_last:
                values["epoch"] = (step + 1) * pairs_per_step(cfg) / len(train_pairs)
                metrics_log.write(step + 1, values)
                if engine.is_main:
                    progress.write(console_line(step + 1, steps, values))
            progress.set_postfix(loss=f"{values['loss']:.4f}",
                                 tok_s=f"{values['tokens_per_second']:.0f}")
            progress.update(1)
            if eval_pairs and (is_last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                eval_result = _evaluate_and_log(cfg, run.path, metrics_log, progress, policy,
                                                reference, eval_pairs, params, pad_id, step + 1,
                                                steps, engine)
            # A signal to any process stops them all after this step.
            stopping = engine.any(stop.requested is not None)
            if (checkpoints.due(step + 1, steps) or stopping) and not engine.sharded:
                if engine.is_main:
                    checkpoints.save(step + 1, policy, optimizer, scheduler, guard.skipped)
                # Every process waits here while process 0 writes, and a signal that arrived
                # during the save (to any process) stops the run right after it.
                stopping = engine.any(stop.requested is not None)
            if stopping:
                stop.requested = stop.requested or "a signal to another process"
                if not engine.is_main:
                    raise KeyboardInterrupt(stop.requested)  # process 0 says where it stopped
                stop.stop(step + 1, run.path, checkpoints.newest)
    finally:
        stop.restore()
        progress.close()
        metrics_log.close()

    # Results: the trained model and the same prompts generated again (process 0).
    after = [generate(policy, tokenizer, p.prompt_ids, cfg.sample_max_new_tokens)
             for p in sample_pairs]
    if needs_reference and sample_pairs:
        if reference is None:
            # The optimizer state (twice the weights) is not needed any more: free it before
            # the reference is loaded again.
            optimizer = scheduler = None
            policy.zero_grad(set_to_none=True)
            reference = reference_for(policy, reload=cfg)
        rewards = sample_rewards(policy, reference, [p.prompt_ids for p in sample_pairs],
                                 before + after, params.beta, pad_id)
    else:
        rewards = None
    if engine.is_main:
        _write_samples(run.path, tokenizer, sample_pairs, before, after, rewards)
    save_policy(cfg, engine, policy, tokenizer, run.path)
    summary = {
        "steps": steps,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "wall_seconds": time.time() - started,
        "final": values,
        "eval": eval_result.metrics if eval_result else {},
    }
    if engine.is_main:
        (run.path / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.report and engine.is_main:
        from preftune.report import write_report

        try:
            log.info("report: %s", write_report(run.path).html)
        except Exception as err:  # the trained model is saved; a figure must not undo that
            log.warning("the report could not be written (%s: %s); the run is complete, "
                        "retry with `preftune report %s`", type(err).__name__, err, run.path)
    engine.close()
    return TrainResult(run.path, values, summary["eval"])


def _run_dir(cfg: TrainConfig) -> RunDir:
    if cfg.resume:
        return RunDir.resume(cfg.resume)
    return RunDir.create(cfg.output, overwrite=cfg.overwrite)


def _sample_pairs(cfg: TrainConfig, engine: Engine, eval_pairs: list[TokenizedPair]):
    """Held-out prompts to generate from before and after training; process 0 only."""
    if not engine.is_main or not cfg.num_samples:
        return []
    if engine.sharded:
        # TODO: generating from sharded weights needs every process in step; no samples yet.
        log.warning("--num-samples: no samples under %s (weights are sharded)", engine.name)
        return []
    return eval_pairs[: cfg.num_samples]


def make_optimizer(cfg: TrainConfig, parameters: list[torch.nn.Parameter],
                   fused: bool = True) -> torch.optim.Optimizer:
    """AdamW, with PyTorch's fused kernel where it has one for the weights' device.

    The fused update reads and writes each weight and its two moments once, where the
    default implementation makes several passes and temporaries the size of every weight:
    on 2 CPU cores it takes a 135M-parameter update from 0.38 s to 0.09 s.
    """
    device = parameters[0].device.type if parameters else "cpu"
    fused = fused and device in ("cpu", "cuda") and all(p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def train_step(
    cfg: TrainConfig,
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    pairs: list[TokenizedPair],
    step: int,
    pad_id: int,
    params,
    engine: Engine | None = None,
) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics.

    Under several processes each reads its slice of every micro-batch, and the metrics are
    those of all the step's pairs.
    """
    engine = engine or Engine()
    started = time.perf_counter()
    micro_batches = [engine.slice(m) for m in
                     batch_indices(cfg, pairs, step, engine.world_size)]  # this process's
    local_pairs = sum(len(m) for m in micro_batches)
    totals: dict[str, torch.Tensor] = {}
    num_tokens = 0
    for k, indices in enumerate(micro_batches):
        # Gradients stay local until the last micro-batch (one sync per step).
        with engine.accumulating(policy, more_to_come=k + 1 < len(micro_batches)):
            # Forward: policy over chosen and rejected together, reference without gradients.
            out = pair_forward(policy, reference, [pairs[i] for i in indices], params, pad_id,
                               cfg.step_options())
            num_tokens += out.num_tokens

            # Loss: the sum over this micro-batch divided by this process's pairs of the step,
            # so accumulation reproduces the mean over the step, and the engine's mean of
            # gradients over processes the mean over every process's pairs.
            engine.backward(out.loss.losses.sum() / local_pairs)
        add_sums(totals, out.metric_sums())
    totals = engine.sum(totals)  # over processes
    num_tokens = engine.sum_count(num_tokens)
    step_pairs = local_pairs * engine.world_size

    # Step: clip, update, clear.
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = engine.clip_grad_norm(policy, max_norm)
    learning_rate = optimizer.param_groups[0]["lr"]
    # A NaN or inf loss or gradient is never applied (one host synchronisation); the loop
    # then stops or skips the batch, as --on-nan says.
    if faults.is_finite(totals["loss"], grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # Log: the only host synchronisation of the step.
    values = averages(totals, step_pairs)
    elapsed = time.perf_counter() - started
    values.update(
        grad_norm=float(grad_norm),
        learning_rate=learning_rate,
        tokens_per_second=num_tokens / elapsed,
        pairs_per_second=step_pairs / elapsed,
        step_seconds=elapsed,
    )
    return values


def _evaluate_and_log(cfg, run_dir, metrics_log, progress, policy, reference, eval_pairs,
                      params, pad_id, step, steps, engine):
    result = evaluate(policy, reference, eval_pairs, params, cfg.batch_size, pad_id,
                      options=cfg.step_options(), engine=engine)
    metrics_log.write(step, {f"eval/{k}": v for k, v in result.metrics.items()})
    if engine.is_main:
        _append_eval_pairs(run_dir, step, result.pairs)
        progress.write(console_line(step, steps, result.metrics) + " (eval)")
    return result


def _progress(cfg: TrainConfig, steps: int, initial: int = 0, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=initial, desc="train", unit="step",
                disable=not (cfg.progress and enabled), dynamic_ncols=True)


def _append_eval_pairs(run_dir: Path, step: int, rows: list[dict]) -> None:
    """Per-pair positions on the loss curve at each evaluation, for the run report."""
    with (run_dir / "eval_pairs.jsonl").open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")


def _write_samples(run_dir, tokenizer, pairs, before, after, rewards) -> None:
    """Before/after generations; rewards are the trained policy's implicit rewards."""
    with (run_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i, (pair, ref_ids, policy_ids) in enumerate(zip(pairs, before, after)):
            row = {
                "source": pair.source,
                "record": pair.record,
                "prompt": pair.prompt_text,
                "reference": tokenizer.decode(ref_ids, skip_special_tokens=True),
                "policy": tokenizer.decode(policy_ids, skip_special_tokens=True),
            }
            if rewards is not None:
                row["reference_reward"] = rewards[i]
                row["policy_reward"] = rewards[len(pairs) + i]
            f.write(json.dumps(row) + "\n")
