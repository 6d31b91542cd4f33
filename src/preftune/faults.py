"""What a training run does when something goes wrong, and the hooks that test it.

- Signals: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the step it is
  in; the loop saves a checkpoint and exits. A second one stops at once, even in the middle
  of writing that checkpoint, which is safe because checkpoints are written to a temporary
  folder and renamed into place only when complete.
- Numerical faults: a step whose loss or gradient norm is NaN or infinite is never applied.
  With ``--on-nan error`` the run stops with a message naming the step and the pairs of the
  batch; with ``--on-nan skip`` the batch is dropped and counted in ``skipped_batches``.
- The environment: a model or data file that does not exist is reported before anything is
  written, and a full or read-only disk gives a message that says what is still intact.

Test hooks, read from the environment and inert when unset; the test suite uses them to
inject faults at an exact point:

- ``PREFTUNE_TEST_NAN_AT_STEP=N``: the policy's input embeddings are multiplied by NaN in
  the training forward passes of step N (1-based, as in metrics.jsonl).
- ``PREFTUNE_TEST_STEP_DELAY=SECONDS``: sleep before every step, so that a test can send a
  signal while the run is in its loop.
- ``PREFTUNE_TEST_SIGNAL_IN_SAVE=N:SIG[,SIG...]``: while checkpoint step-N is half written
  (after its weights, before the rest), the process sends itself each signal in turn,
  e.g. ``4:SIGKILL`` or ``4:SIGINT,SIGINT``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

if TYPE_CHECKING:
    from preftune.config import TrainConfig
    from preftune.data.tokenize import TokenizedPair

log = logging.getLogger(__name__)

# Write errors that mean "this disk or folder cannot take the run's files".
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class NumericalFault(ValueError):
    """A training step produced a NaN or infinite loss or gradient norm."""


class OutputError(ValueError):
    """The run directory cannot take more files (full disk, quota, read-only, permissions)."""


# Signals


class StopSignals:
    """SIGINT and SIGTERM ask the training loop to stop after the current step.

    The handler records the request and says so on stderr; the loop saves a checkpoint after
    the step it is in and calls :meth:`stop`. A second signal raises ``KeyboardInterrupt`` at
    once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the first signal received
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Take over SIGINT and SIGTERM; outside the main thread signals stay as they are."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {name}")
        self.requested = name
        # os.write, not print: a buffered stream may be in the middle of a write right now.
        os.write(
            2,
            f"\n{name}: finishing this step, then saving a checkpoint; press Ctrl-C "
            "again to stop at once\n".encode(),
        )

    def stop(self, step: int, run_dir: Path, saved: Path | None) -> NoReturn:
        """Report where the run stopped and how to continue it, then stop."""
        where = f"checkpoint saved at {saved}" if saved else "no checkpoint was saved"
        log.warning(
            "%s: stopped after step %d; %s; continue with: preftune train --resume %s",
            self.requested,
            step,
            where,
            run_dir,
        )
        raise KeyboardInterrupt(self.requested)


# Numerical faults


def is_finite(*values: torch.Tensor) -> bool:
    """True when every element of every tensor is finite (one host synchronisation)."""
    return bool(torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values])).all())


class NanGuard:
    """Stops the run at a step with a NaN or inf loss or gradient norm, or counts it skipped.

    The step itself has already declined to apply the update (see ``train.train_step``); the
    guard decides whether the run goes on. ``checkpoints.newest`` names the checkpoint left
    to resume from.
    """

    def __init__(self, on_nan: str, checkpoints, skipped: int = 0) -> None:
        self.on_nan = on_nan  # "error" or "skip", as --on-nan
        self.checkpoints = checkpoints
        self.skipped = skipped

    def check(
        self, step: int, values: dict[str, float], batch: Callable[[], Sequence[TokenizedPair]]
    ) -> None:
        """Add ``skipped_batches`` to ``values``; raise NumericalFault in error mode.

        ``batch`` is called only on a fault, to name the pairs (``source:record``) of the step.
        """
        bad = {k: values[k] for k in ("loss", "grad_norm") if not math.isfinite(values[k])}
        if bad:
            problem = " and ".join(f"{name} {value}" for name, value in bad.items())
            pairs = ", ".join(f"{pair.source}:{pair.record}" for pair in batch())
            if self.on_nan == "error":
                newest = self.checkpoints.newest
                kept = f"the last checkpoint {newest} is intact" if newest else "no checkpoint yet"
                raise NumericalFault(
                    f"step {step}: {problem}; the update was not applied and training stopped "
                    f"({kept}). Pairs of the batch: {pairs}. Pass --on-nan skip to skip such "
                    "batches instead"
                )
            self.skipped += 1
            log.warning("step %d: %s; batch skipped, no update (pairs: %s)", step, problem, pairs)
        values["skipped_batches"] = self.skipped


# The environment


def preflight(cfg: TrainConfig) -> None:
    """Check what can be checked before the run directory is written or a model loaded.

    Raises:
        ModelError: the model spec names a local path that does not exist or is no model.
        DataError: a local data file is missing, a folder, or of an unsupported type.
    """
    from preftune import models
    from preftune.data.pipeline import resolve_data
    from preftune.data.sources import looks_like_hub_id, read_records

    models.resolve(cfg.model)
    specs = [(cfg.data, cfg.data_split, "train")]
    if cfg.eval_data is not None:
        specs.append((cfg.eval_data, cfg.eval_split, "eval"))
    for spec, split, role in specs:
        spec = resolve_data(spec, role)
        if not looks_like_hub_id(spec) or Path(spec).exists():
            read_records(spec, split=split).close()  # checks the path; reads nothing yet


@contextlib.contextmanager
def output_errors(cfg: TrainConfig) -> Iterator[None]:
    """Turn a full, read-only or forbidden run directory into a message that says what is kept.

    ``cfg.output`` is read when the error happens: training sets it to the run directory.
    A full disk is reported wherever it happens; a permission error only inside the run
    directory (elsewhere it means something else, and keeps its own message).
    """
    try:
        yield
    except OSError as err:
        run_dir = Path(cfg.output) if cfg.output else None
        if err.errno not in OUTPUT_ERRNOS or run_dir is None:
            raise
        inside = err.filename is None or _is_inside(Path(str(err.filename)), run_dir)
        if not inside and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = f"the run directory {run_dir}" if inside else str(err.filename)
        message = f"cannot write {what}: {err.strerror}; files written before this are intact"
        if any((run_dir / "checkpoints").glob("step-*")):
            message += f"; once that is fixed, continue with: preftune train --resume {run_dir}"
        raise OutputError(message) from err


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


# Test hooks


class TestHooks:
    """Fault injection for the test suite (see the module docstring); inert unless asked."""

    __test__ = False  # not a pytest test class

    def __init__(self, policy: torch.nn.Module, nan_at_step: int | None, delay: float) -> None:
        self.nan_at_step = nan_at_step
        self.delay = delay
        self.step = 0
        if nan_at_step is not None:
            policy.get_input_embeddings().register_forward_hook(self._poison)

    @classmethod
    def from_env(cls, policy: torch.nn.Module) -> TestHooks:
        nan_at = os.environ.get("PREFTUNE_TEST_NAN_AT_STEP")
        delay = float(os.environ.get("PREFTUNE_TEST_STEP_DELAY", "0"))
        return cls(policy, int(nan_at) if nan_at else None, delay)

    def before_step(self, step: int) -> None:
        self.step = step
        if self.delay:
            time.sleep(self.delay)

    def _poison(self, module: torch.nn.Module, args: tuple, output: torch.Tensor):
        # Training forwards only: the reference, evaluation and sampling run without grad.
        if self.step == self.nan_at_step and torch.is_grad_enabled():
            return output * float("nan")
        return None


def signal_during_save(step: int) -> None:
    """Test hook called halfway through writing a checkpoint (PREFTUNE_TEST_SIGNAL_IN_SAVE)."""
    hook = os.environ.get("PREFTUNE_TEST_SIGNAL_IN_SAVE")
    if not hook:
        return
    at, _, names = hook.partition(":")
    if int(at) != step:
        return
    for name in names.split(","):
        os.kill(os.getpid(), getattr(signal, name.strip()))
