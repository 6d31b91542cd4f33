"""Checkpoints: atomic saves of the whole training state, and resuming from the newest one.

A checkpoint is a folder ``RUN_DIR/checkpoints/step-N/`` holding everything that step N
of the run depends on:

- ``model.safetensors``: the policy weights (for a LoRA policy, the adapter weights alone:
  the base never changes and is loaded from ``--model``);
- ``optimizer.pt``: optimizer and learning-rate scheduler state (tensors and numbers only);
- ``rng.json``: the torch, Python and NumPy random states;
- ``trainer_state.json``: the step, skipped batches, a fingerprint of the training pairs
  and the size of ``eval_pairs.jsonl`` at step N;
- ``metrics.jsonl``: the run's metrics as they stood at step N;
- ``config.yaml``: the resolved configuration;
- ``manifest.json``: size and SHA-256 of each file above, written last.

The step number is the data position: the order of training pairs is a pure function of
the seed, the epoch and the step (see ``train.step_batches``), so a resumed run reads the
same pairs as an unbroken one; the fingerprint confirms the pairs themselves are the same.

A checkpoint is written to a staging folder beside the others, each file and the folder are
flushed to disk, and only then is the folder renamed to ``step-N``. A crash, a full disk or
a second Ctrl-C before the rename leaves the previous checkpoints as they were and a staging
folder that the next resume removes. A folder whose manifest is missing or does not match
its files is never loaded.

Loading never runs code from a checkpoint: weights come through safetensors, the optimizer
state through ``torch.load(weights_only=True)``, the rest is JSON and safe YAML.

Under several data-parallel processes the weights and optimizer state are the same in every
process: process 0 writes checkpoints, every process loads the same one, and process 0 alone
puts the run's logs back as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml

from preftune.config import RUN_ONLY_FIELDS, ConfigError, TrainConfig, field_names
from preftune.faults import signal_during_save

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_STAGING_PREFIX = ".staging-"
# Files of the run directory that grow as training goes and are cut back on resume.
METRICS_FILE = "metrics.jsonl"
EVAL_PAIRS_FILE = "eval_pairs.jsonl"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or resumed from; the message says why."""


@dataclass
class TrainerState:
    """Where the loop stands: the steps done and the batches skipped for NaN or inf."""

    step: int = 0
    skipped_batches: int = 0


class Checkpoints:
    """The checkpoints of one run: periodic, final and on-signal saves, and resuming.

    With ``cfg.resume`` set, the newest complete checkpoint is chosen at construction (before
    any model is loaded) and a config that differs from the checkpoint's in a way that changes
    results is refused unless ``cfg.allow_config_change``.
    """

    def __init__(self, run_dir: Path, cfg: TrainConfig, writer: bool = True) -> None:
        self.root = Path(run_dir) / FOLDER
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.writer = writer  # False in processes other than 0: they read, never write
        self.newest: Path | None = None  # the newest complete checkpoint on disk
        self._fingerprint = ""
        self._num_pairs = 0
        self._resume_from: Path | None = None
        self._config_changed = False
        if cfg.resume:
            self._resume_from = newest_valid(self.run_dir)
            saved = yaml.safe_load((self._resume_from / "config.yaml").read_text(encoding="utf-8"))
            changed = changed_keys(saved, cfg)
            if changed and not cfg.allow_config_change:
                raise ConfigError(
                    f"--resume {run_dir}: the config differs from {self._resume_from.name}'s in "
                    f"{', '.join(changed)}, which changes the results; pass "
                    "--allow-config-change to resume with it anyway"
                )
            if changed:
                log.warning("resuming with a changed config: %s", ", ".join(changed))
                self._config_changed = True
            self.newest = self._resume_from

    def due(self, step: int, total_steps: int) -> bool:
        """A checkpoint is due every ``--save-every`` steps and after the last step."""
        every = self.cfg.save_every
        return step == total_steps or (every > 0 and step % every == 0)

    def restore(
        self,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_pairs: Sequence,
        total_steps: int,
    ) -> TrainerState:
        """Load the chosen checkpoint into the models and the run directory's logs.

        Without ``--resume`` this only fingerprints the training pairs and returns step 0.

        Raises:
            CheckpointError: the training pairs differ from the checkpoint's (unless
                ``--allow-config-change``), or the checkpoint is already at the last step.
        """
        self._fingerprint = data_fingerprint(train_pairs)
        self._num_pairs = len(train_pairs)
        if self._resume_from is None:
            return TrainerState()
        folder = self._resume_from
        saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        state = TrainerState(saved["step"], saved["skipped_batches"])
        if saved["data_fingerprint"] != self._fingerprint:
            message = (
                f"{folder}: the training pairs differ from those the checkpoint was trained on "
                f"({len(train_pairs)} pairs now, {saved['num_pairs']} then)"
            )
            if not self.cfg.allow_config_change:
                raise CheckpointError(message + "; pass --allow-config-change to resume anyway")
            log.warning("%s; resuming anyway", message)
        if state.step >= total_steps:
            raise CheckpointError(
                f"{folder}: the run already finished its {total_steps} steps; to train further, "
                "raise --max-steps (or --epochs) and pass --allow-config-change"
            )

        # Weights, optimizer and schedule, random states; nothing here can run code.
        fresh_groups = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        fresh_base_lrs = list(scheduler.base_lrs)
        try:
            _load_weights(policy, folder / "model.safetensors")
            trainer = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            set_rng_state(json.loads((folder / "rng.json").read_text(encoding="utf-8")))
        except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{folder}: cannot be loaded ({err})") from err
        if self._config_changed:
            _apply_new_hyperparameters(optimizer, scheduler, fresh_groups, fresh_base_lrs)
        if not self.writer:
            return state

        # The run's logs: rows written after the checkpoint move aside; the rest stays.
        moved = _restore_log(self.run_dir / METRICS_FILE, (folder / METRICS_FILE).read_bytes())
        eval_pairs = _read_or_empty(self.run_dir / EVAL_PAIRS_FILE)
        _restore_log(self.run_dir / EVAL_PAIRS_FILE, eval_pairs[: saved["eval_pairs_bytes"]])
        self._remove_abandoned(state.step)
        log.info(
            "resuming from %s (step %d of %d)%s",
            folder,
            state.step,
            total_steps,
            f"; {moved} metric row(s) written after it moved to metrics.replaced.jsonl"
            if moved
            else "",
        )
        return state

    def save(
        self,
        step: int,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        skipped_batches: int,
    ) -> Path:
        """Write checkpoint ``step-N`` atomically, then keep only the newest ``--keep-checkpoints``.

        Raises:
            CheckpointError: the checkpoint could not be written (a full disk, ...); nothing
                that was on disk before is changed.
        """
        self.root.mkdir(exist_ok=True)
        target = self.root / f"step-{step}"
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}step-{step}-", dir=self.root))
        try:
            _save_weights(policy, staging / "model.safetensors")
            _fsync_file(staging / "model.safetensors")
            signal_during_save(step)
            with open(staging / "optimizer.pt", "wb") as f:
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, f
                )
                f.flush()
                os.fsync(f.fileno())
            _write(staging / "rng.json", json.dumps(rng_state()).encode())
            _write(
                staging / "trainer_state.json",
                _json_bytes(
                    {
                        "step": step,
                        "skipped_batches": skipped_batches,
                        "num_pairs": self._num_pairs,
                        "data_fingerprint": self._fingerprint,
                        "eval_pairs_bytes": _size(self.run_dir / EVAL_PAIRS_FILE),
                    }
                ),
            )
            _write(staging / METRICS_FILE, _read_or_empty(self.run_dir / METRICS_FILE))
            _write(
                staging / "config.yaml",
                yaml.safe_dump(self.cfg.to_dict(), sort_keys=False).encode(),
            )
            manifest = {
                path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                for path in sorted(staging.iterdir())
            }
            _write(staging / MANIFEST, _json_bytes(manifest))
            _fsync_dir(staging)
            if target.exists():  # an abandoned folder of the same step from an earlier attempt
                _remove(target)
            os.rename(staging, target)
            _fsync_dir(self.root)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            kept = f"{self.newest} is intact" if self.newest else "no earlier checkpoint exists"
            raise CheckpointError(
                f"{target}: could not write the checkpoint ({err.strerror or err}); {kept}"
            ) from err
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.newest = target
        self._prune()
        return target

    def _prune(self) -> None:
        for folder in step_folders(self.run_dir)[self.cfg.keep_checkpoints :]:
            _remove(folder)

    def _remove_abandoned(self, step: int) -> None:
        """Remove staging folders and broken checkpoints past the one resumed from."""
        for leftover in sorted(self.root.glob(_STAGING_PREFIX + "*")):
            log.warning("removing %s, a checkpoint whose writing was interrupted", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in step_folders(self.run_dir):
            if _step_of(folder) > step:
                log.warning(
                    "removing %s, an incomplete checkpoint newer than the one resumed from", folder
                )
                _remove(folder)


def _apply_new_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: Any, groups: list[dict], base_lrs: list[float]
) -> None:
    """After a deliberate config change, the new --lr, --weight-decay and schedule apply.

    Loading an optimizer's state also loads its old hyperparameters, and a scheduler's state
    its old base learning rates; both are put back to the values the new config built, and
    the learning rate is set to the new schedule's value at the resumed step.
    """
    for group, fresh in zip(optimizer.param_groups, groups):
        group.update(fresh)
    scheduler.base_lrs = base_lrs
    for group, base_lr, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _save_weights(policy: torch.nn.Module, path: Path) -> None:
    from preftune import lora

    if lora.is_lora(policy):
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in lora.trainable_state(policy).items()}, str(path)
        )
    else:
        safetensors.torch.save_model(policy, str(path))


def _load_weights(policy: torch.nn.Module, path: Path) -> None:
    from preftune import lora

    device = str(next(policy.parameters()).device)
    if lora.is_lora(policy):
        lora.load_trainable_state(policy, safetensors.torch.load_file(path, device=device))
    else:
        safetensors.torch.load_model(policy, path, strict=True, device=device)


# Finding checkpoints


def step_folders(run_dir: Path) -> list[Path]:
    """The run's ``step-N`` folders, newest first (complete or not)."""
    root = Path(run_dir) / FOLDER
    folders = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(folders, key=_step_of, reverse=True)


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (OSError, ValueError) as err:
        return f"unreadable manifest.json ({err})"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_valid(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; broken ones are skipped with a message.

    Raises:
        CheckpointError: the run has no complete checkpoint.
    """
    skipped = []
    for folder in step_folders(run_dir):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
        skipped.append(f"{folder.name}: {problem}")
    detail = f" (skipped {'; '.join(skipped)})" if skipped else ""
    raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from{detail}")


# Config on resume


def resume_values(values: dict[str, Any]) -> dict[str, Any]:
    """The run's saved config, with the values given now (flags, --config) on top.

    Raises:
        ConfigError: the folder has no config.yaml, or --output names another folder.
    """
    run_dir = Path(values["resume"])
    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"--resume {run_dir}: no config.yaml there; is it a run directory?"
        ) from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--resume {run_dir}: cannot read config.yaml ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {run_dir}: config.yaml is not a mapping of config keys")
    if values.get("output") not in (None, str(run_dir)):
        raise ConfigError(f"--output {values['output']} differs from --resume {run_dir}")
    known = set(field_names())
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update(values)
    # Permission to change the config is given afresh each time, never inherited.
    merged.update(
        output=str(run_dir),
        overwrite=False,
        allow_config_change=values.get("allow_config_change", False),
    )
    return merged


def changed_keys(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Config keys that differ from a checkpoint's and change what training computes.

    Keys the checkpoint does not have (added in a later version) compare against their
    default; keys this version does not know are ignored.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    current = cfg.to_dict()
    return [
        f"{name} ({saved.get(name, defaults[name])!r} -> {current[name]!r})"
        for name in field_names()
        if name not in RUN_ONLY_FIELDS and saved.get(name, defaults[name]) != current[name]
    ]


# State pieces


def data_fingerprint(pairs: Sequence) -> str:
    """A hash of the token ids of every training pair, in order."""
    from preftune.reference import cache_key

    return cache_key("training pairs", list(pairs))


def rng_state() -> dict[str, Any]:
    """Every random state a run can touch, as JSON-ready lists."""
    import numpy as np

    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# Files


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Rename first, so that a crash halfway through never leaves a plausible ``step-N``."""
    doomed = folder.with_name(f"{_STAGING_PREFIX}removing-{folder.name}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _restore_log(path: Path, kept: bytes) -> int:
    """Make ``path`` hold exactly ``kept``; lines beyond it go to ``<stem>.replaced.jsonl``.

    Returns the number of lines moved aside.
    """
    current = _read_or_empty(path)
    if current == kept:
        return 0
    # A file cut short (a full disk) only lacks rows the checkpoint kept: nothing to move.
    extra = b"" if kept.startswith(current) else current.removeprefix(kept)
    if extra:
        with open(path.with_name(path.stem + ".replaced.jsonl"), "ab") as f:
            f.write(extra if extra.endswith(b"\n") else extra + b"\n")
    staging = path.with_name(f".{path.name}.restoring")
    _write(staging, kept)
    os.replace(staging, path)
    return len(extra.splitlines())


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.fullmatch(folder.name).group(1))
