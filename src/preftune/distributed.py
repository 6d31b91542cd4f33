"""Running one training over several processes: data parallelism through accelerate.

A run started by ``accelerate launch -m preftune train ...``, by ``torch.distributed.run``,
or by ``preftune train --num-processes N`` (which starts ``torch.distributed.run`` itself on
127.0.0.1) trains data-parallel through ``accelerate.Accelerator``: DDP by default (gloo on
CPU, NCCL on GPUs), or FSDP or DeepSpeed ZeRO when accelerate's own config file asks for
them. Without a launcher a run is one process, and :class:`Engine`, whose collectives do
nothing, keeps it exactly as it always was.

What every engine guarantees (``train.train_step`` relies on it):

- one optimizer step reads ``batch_size * grad_accum * num_processes`` pairs from the same
  seeded stream as a single process; each micro-batch of ``batch_size * num_processes``
  pairs is cut into one contiguous slice per process;
- each process's loss is its pairs' sum divided by its own pair count, and the engine
  averages gradients over processes, so the gradient is the single-process mean over all
  the step's pairs;
- metric sums are added over processes before averaging, so the logged values are those of
  one process reading every pair;
- process 0 alone writes files; the others wait where they would race it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCALHOST = "127.0.0.1"


class DistributedError(ValueError):
    """Another process failed, or the launcher and the config disagree."""


def launched() -> bool:
    """Whether this process was started by a launcher as one of several (or for FSDP/ZeRO)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return any(os.environ.get(name, "").lower() == "true"
               for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def is_main_process() -> bool:
    """Process 0 of a launched job, or a process that no launcher started."""
    return int(os.environ.get("RANK", "0")) == 0


def single_device(choice: str) -> torch.device:
    """The device of a single-process run for ``--device`` (``accelerate launch --cpu``
    with one process counts as ``cpu``)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DistributedError("--device cuda: no CUDA device is available")
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if choice == "cpu" or forced_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class Engine:
    """One process: the identity for every collective, plain ``backward`` and clipping."""

    world_size = 1
    rank = 0
    sharded = False  # weights split over processes (FSDP, ZeRO-3): no direct model calls
    name = "single process"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # Models

    def place(self, model: nn.Module) -> nn.Module:
        """Move a model to this process's device (sharded engines place on prepare)."""
        return model.to(self.device)

    def prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer):
        """Hand the policy and its optimizer to the engine; returns the optimizer to step."""
        return optimizer

    def prepare_reference(self, reference: nn.Module) -> nn.Module:
        reference.eval()
        return reference

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def accumulating(self, policy: nn.Module, more_to_come: bool):
        """While more micro-batches follow, gradients are kept local (no sync)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, policy: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)

    def full_state_dict(self, policy: nn.Module) -> dict[str, torch.Tensor] | None:
        """The policy's whole state dict (None: save from the model itself)."""
        return None

    # Data

    def slice(self, micro_batch: list[int]) -> list[int]:
        """This process's contiguous part of a micro-batch of the whole step."""
        per = len(micro_batch) // self.world_size
        return micro_batch[self.rank * per : (self.rank + 1) * per]

    def shard(self, items: list[T]) -> tuple[list[T], int]:
        """This process's share of ``items``, padded so every process gets as many.

        Returns the share and how many of its leading items are real; the padding repeats
        the last item so that every process makes the same calls (engines that gather
        weights need that), and is then ignored. Shares are contiguous and in rank order,
        so gathering them gives ``items`` back, then the padding.
        """
        if not items:
            return [], 0
        per = max(1, math.ceil(len(items) / self.world_size))
        share = items[self.rank * per : (self.rank + 1) * per]
        real = len(share)
        return share + [items[-1]] * (per - real), real

    # Collectives

    def sum(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metric sums added over processes (same keys in every process)."""
        return totals

    def sum_count(self, count: int) -> int:
        return count

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along dim 0, in rank order."""
        return tensor

    def gather_objects(self, items: list) -> list:
        return items

    def any(self, flag: bool) -> bool:
        """True in every process when ``flag`` is true in at least one."""
        return flag

    def barrier(self) -> None:
        pass

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in process 0 and give its (picklable) result to every process.

        Raises:
            DistributedError: in the other processes, when ``fn`` raised in process 0
                (which raises the original error).
        """
        return fn()

    def close(self) -> None:
        pass


class AcceleratedEngine(Engine):
    """Several processes through ``accelerate.Accelerator`` (DDP, FSDP or DeepSpeed)."""

    def __init__(self, cpu: bool, batch_size: int = 1, max_grad_norm: float = 0.0) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.accelerator = Accelerator(cpu=cpu)
        state = self.accelerator.state
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        kind = state.distributed_type
        self.sharded = kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.deepspeed = kind == DistributedType.DEEPSPEED
        self.name = f"{kind.value} x{self.world_size} ({self.device.type})"
        self._wrapped: nn.Module | None = None
        if self.deepspeed:
            # DeepSpeed reads these from its own config; they follow preftune's flags here.
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config["train_micro_batch_size_per_gpu"] = batch_size
            config["train_batch_size"] = batch_size * self.world_size
            config["gradient_accumulation_steps"] = 1
            config["gradient_clipping"] = max_grad_norm

    def place(self, model: nn.Module) -> nn.Module:
        return model if self.sharded else model.to(self.device)

    def prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer):
        from preftune.forward import route
        from preftune.logps import SequenceLogps

        wrapped, optimizer = self.accelerator.prepare(SequenceLogps(policy), optimizer)
        route(policy, wrapped)
        self._wrapped = wrapped
        return optimizer

    def prepare_reference(self, reference: nn.Module) -> nn.Module:
        """DDP: a replica in eval mode. FSDP and ZeRO-3: sharded like the policy, eval."""
        from preftune.forward import route
        from preftune.logps import SequenceLogps

        reference.eval()
        reference.requires_grad_(False)
        if not self.sharded:
            return reference
        if self.deepspeed:
            wrapped = _deepspeed_inference(SequenceLogps(reference), self.accelerator)
        else:
            wrapped = self.accelerator.prepare(SequenceLogps(reference))
        wrapped.eval()
        route(reference, wrapped)
        return reference

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def accumulating(self, policy: nn.Module, more_to_come: bool):
        if not more_to_come or self._wrapped is None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self._wrapped)

    def clip_grad_norm(self, policy: nn.Module, max_norm: float) -> torch.Tensor:
        norm = self.accelerator.clip_grad_norm_(self._wrapped.parameters(), max_norm)
        if norm is None:  # DeepSpeed clips inside its step and reports the norm afterwards
            return torch.tensor(float("nan"))
        return norm

    def full_state_dict(self, policy: nn.Module) -> dict[str, torch.Tensor] | None:
        if not self.sharded:
            return None
        # A collective: every process takes part, process 0 receives the whole state.
        state = self.accelerator.get_state_dict(self._wrapped)
        prefix = "model."
        return {k.removeprefix(prefix): v for k, v in state.items()} if self.is_main else None

    def sum(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = sorted(totals)
        stacked = torch.stack([totals[n].detach().float().reshape(()).to(self.device)
                               for n in names])
        stacked = self.accelerator.reduce(stacked, reduction="sum")
        return dict(zip(names, stacked.unbind()))

    def sum_count(self, count: int) -> int:
        total = torch.tensor([count], dtype=torch.long, device=self.device)
        return int(self.accelerator.reduce(total, reduction="sum").item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.to(self.device)).cpu()

    def gather_objects(self, items: list) -> list:
        from accelerate.utils import gather_object

        return gather_object(items)

    def any(self, flag: bool) -> bool:
        return self.sum_count(int(flag)) > 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def on_main(self, fn: Callable[[], T]) -> T:
        from accelerate.utils import broadcast_object_list

        outcome: list[Any] = [None, None]  # [error message, result]
        error = None
        if self.is_main:
            try:
                outcome[1] = fn()
            except Exception as err:  # noqa: BLE001 - shared with the others, raised below
                error = err
                outcome[0] = f"{type(err).__name__}: {err}"
        broadcast_object_list(outcome, from_process=0)
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise DistributedError(f"process 0 failed ({outcome[0]}); process {self.rank} stops")
        return outcome[1]

    def close(self) -> None:
        self.barrier()
        self.accelerator.end_training()


def _deepspeed_inference(module: nn.Module, accelerator) -> nn.Module:
    """A frozen module under the training run's ZeRO config, without optimizer or schedule.

    TODO: written for GPUs and not yet run; only DDP has run (on CPU) so far.
    """
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    if config.get("zero_optimization", {}).get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}  # stages 1-2 shard optimizer state only
    engine, *_ = deepspeed.initialize(model=module, config=config)
    return engine


def start(cfg) -> Engine:
    """The engine for this process: accelerate under a launcher, else a single process.

    Raises:
        DistributedError: ``--num-processes`` disagrees with the launcher's process count.
    """
    if not launched():
        if cfg.num_processes > 1:
            raise DistributedError(
                f"--num-processes {cfg.num_processes}: this process was not started by a "
                "launcher; run `preftune train` (which starts them) or `accelerate launch`"
            )
        return Engine(single_device(cfg.device))
    cpu = single_device(cfg.device).type == "cpu"
    engine = AcceleratedEngine(cpu, cfg.batch_size, cfg.max_grad_norm)
    if cfg.num_processes not in (1, engine.world_size):
        raise DistributedError(
            f"--num-processes {cfg.num_processes} differs from the launcher's "
            f"{engine.world_size} processes"
        )
    if engine.sharded and cfg.resume:
        # TODO: checkpoints of sharded weights and optimizer state are not written yet.
        raise DistributedError(f"--resume is not supported under {engine.name} yet")
    if engine.deepspeed and cfg.grad_accum != 1:
        # TODO: DeepSpeed steps inside backward(); accumulation would need its own schedule.
        raise DistributedError("--grad-accum must be 1 under DeepSpeed (raise --batch-size)")
    cfg.num_processes = engine.world_size
    if not engine.is_main:
        logging.getLogger("preftune").setLevel(logging.WARNING)  # one voice: process 0's
    log.info("training on %s", engine.name)
    return engine


# Starting the processes ourselves


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run ``preftune ARGV`` as ``num_processes`` processes of one job on this machine.

    The processes rendezvous on 127.0.0.1 (a free port) and, on CPU, talk gloo over the
    loopback interface. Returns the job's exit status.
    """
    port = _free_local_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={num_processes}",
        "--nnodes=1", f"--master-addr={LOCALHOST}", f"--master-port={port}",
        "-m", "preftune", *argv,
    ]
    env = dict(os.environ)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    log.info("starting %d processes (torch.distributed.run on %s:%d)", num_processes,
             LOCALHOST, port)
    proc = subprocess.Popen(command, env=env)
    # Ctrl-C reaches the launcher from the terminal, and it passes the signal on to every
    # process, which stops after its step (see train.train); a SIGTERM sent to this process
    # alone is passed on the same way. A job stopped so exits 128 + the signal's number,
    # as a single process would, not the launcher's generic failure status.
    received: list[int] = []

    def note(signum: int, frame: object) -> None:
        received.append(signum)
        if signum == signal.SIGTERM:
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()  # resumed after each handled signal (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]
