"""Typed training configuration: one default per field, YAML in and out, validation.

Every field of :class:`TrainConfig` is also a command-line flag (``max_steps`` becomes
``--max-steps``); the text in ``help`` metadata becomes the flag's ``--help``. A YAML file
sets fields by the same names, and flags given on the command line win over the file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # What to train.
    model: str = _f(
        "smollm2-135m-instruct",
        "model: a Hugging Face hub id, a local folder, a .gguf file, or the alias "
        "smollm2-135m-instruct (embedded)",
    )
    data: str = _f(
        "demo", "training pairs: a .jsonl(.gz)/.json/.csv/.parquet file, a hub dataset, or 'demo'"
    )
    data_split: str = _f("train", "split to read when --data is a hub dataset")
    eval_data: str | None = _f(
        None,
        "held-out pairs (same formats). Default: the demo's eval split for --data demo, "
        "otherwise --eval-fraction of the training pairs",
    )
    eval_split: str = _f("test", "split to read when --eval-data is a hub dataset")
    eval_fraction: float = _f(
        0.05, "share of training pairs held out when --eval-data is unset (0: no evaluation)"
    )
    max_eval_pairs: int = _f(256, "at most this many held-out pairs are evaluated")
    limit: int | None = _f(None, "use only the first N usable training pairs (file order)")
    output: str | None = _f(None, "run directory (default: runs/<timestamp>)")
    overwrite: bool = _f(False, "replace an existing run directory")
    trust_remote_code: bool = _f(False, "allow model code from the hub to run (off by default)")
    dtype: str = _f(
        "float32", "weight dtype (float16 is refused: DPO's log-prob sums overflow its range)",
        ("float32", "bfloat16"),
    )
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    device: str = _f(
        "auto",
        "where to train: auto is cuda when available, else cpu; under a launcher each "
        "process takes its own GPU, or stays on CPU with cpu",
        ("auto", "cpu", "cuda"),
    )

    # Tokenization.
    max_length: int = _f(512, "longest prompt + response in tokens; prompts are cut from the left")
    chat_template: str = _f(
        "auto",
        "auto: chat template for message lists, plain text for strings; always: also wrap "
        "string prompts as one user turn; never: plain text only",
        ("auto", "always", "never"),
    )
    on_bad_record: str = _f(
        "skip",
        "skip: drop unusable records and list them in data_report.json; error: stop at the first",
        ("skip", "error"),
    )

    # The objective.
    loss: str = _f("sigmoid", "loss from the DPO family (see `preftune loss --help`)")
    beta: float = _f(0.1, "KL anchor strength: large stays near the reference")
    label_smoothing: float = _f(0.0, "label noise epsilon for sigmoid (cDPO) and robust, [0, 0.5)")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin")
    rpo_alpha: float = _f(0.0, "weight of an NLL term on the chosen response (0: off)")

    # Optimization.
    lr: float = _f(1e-6, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    scheduler: str = _f(
        "linear", "learning-rate decay after warmup", ("linear", "cosine", "constant")
    )
    warmup_ratio: float = _f(0.1, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    batch_size: int = _f(4, "pairs per micro-batch in each process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(-1, "optimizer steps (-1: run --epochs)")
    epochs: float = _f(1.0, "passes over the training pairs when --max-steps is -1")
    shuffle: bool = _f(True, "shuffle the training pairs every epoch")
    seed: int = _f(0, "seed for data order, held-out split and sampling")

    # Parameter-efficient training: LoRA adapters (peft); the reference is the same model with
    # its adapters off, so the base weights are held once.
    lora: bool = _f(False, "train LoRA adapters instead of every weight")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA scale numerator: updates are scaled by alpha / r")
    lora_dropout: float = _f(
        0.0, "dropout on the LoRA input, [0, 1); 0 because DPO compares log-probs of two passes"
    )
    lora_target_modules: str = _f(
        "auto",
        "comma-separated module names to adapt; auto: every attention and MLP projection of "
        "Llama-family and GPT-2 models, peft's defaults for other architectures; all-linear: "
        "every linear layer but the output head",
    )
    merge: bool = _f(
        False, "with --lora: also write the adapter merged into the base as RUN/model-merged"
    )

    # Precision and memory.
    autocast: bool = _f(
        False, "run forward passes under torch.autocast in bfloat16 (log-softmax and the loss "
        "stay float32)"
    )
    gradient_checkpointing: bool = _f(
        True, "recompute each layer's activations in the backward pass: less memory for one "
        "more forward pass, same gradients"
    )

    # Scaling out: data-parallel processes (see docs/scaling.md).
    num_processes: int = _f(
        1, "data-parallel processes; above 1 preftune starts them itself (torch.distributed, "
        "on 127.0.0.1); under `accelerate launch` it is the launcher's process count"
    )

    # Speed: every switch is exact (same log-probs as the naive path), so all default to on,
    # except grouping by length, which changes which pairs share a batch.
    prefix_sharing: bool = _f(
        True, "score chosen and rejected in one row sharing the prompt (where the model allows)"
    )
    packing: bool = _f(
        True, "with prefix sharing: all pairs of a micro-batch in one row, no padding "
        "(where the model's attention is sdpa)"
    )
    concat_forward: bool = _f(True, "one model call for chosen and rejected rows together")
    head_only: bool = _f(
        True, "vocabulary head and log-softmax on response positions only, in chunks"
    )
    precompute_reference: bool = _f(
        True, "compute reference log-probs once before training (cached on disk), then free it"
    )
    group_by_length: bool = _f(
        False, "batch pairs of similar length together within each epoch: less padding in "
        "the padded layouts (packing leaves none to cut)"
    )

    # What the user sees.
    log_every: int = _f(1, "write metrics every N steps")
    eval_every: int = _f(50, "evaluate on the held-out pairs every N steps (0: only at the end)")
    num_samples: int = _f(4, "held-out prompts generated before and after training (0: none)")
    sample_max_new_tokens: int = _f(64, "tokens generated per sample")
    progress: bool = _f(True, "show a progress bar")
    report: bool = _f(
        False, "write report.html and its figures into the run directory at the end "
        "(the same as running `preftune report RUN_DIR`)"
    )

    # Checkpoints and faults.
    save_every: int = _f(
        100, "save a checkpoint every N steps (0: only after the last step and on Ctrl-C/SIGTERM)"
    )
    keep_checkpoints: int = _f(2, "keep the newest K checkpoints, delete older ones")
    resume: str | None = _f(
        None, "continue the run in this directory from its newest complete checkpoint"
    )
    allow_config_change: bool = _f(
        False, "with --resume: accept a config that changes results (e.g. a new --lr)"
    )
    on_nan: str = _f(
        "error",
        "a NaN or inf loss or gradient norm: error stops the run; skip drops the batch (no "
        "update) and counts it in skipped_batches",
        ("error", "skip"),
    )

    def __post_init__(self) -> None:
        if self.dtype == "float16":
            raise ConfigError(
                "--dtype float16 is not supported: sequence log-probs and their gradients "
                "overflow float16's range and turn into NaN without loss scaling; use "
                "--dtype bfloat16, or float32 weights with --autocast"
            )
        for name in ("batch_size", "grad_accum", "max_length", "log_every", "lora_r",
                     "num_processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        for name in ("eval_every", "num_samples", "threads", "max_eval_pairs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        if self.sample_max_new_tokens < 1:
            raise ConfigError(f"--sample-max-new-tokens must be >= 1 (got {self.sample_max_new_tokens})")
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be >= 8 tokens (got {self.max_length})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0 (got {self.lr})")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0 (got {self.max_grad_norm})")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be >= 1, or -1 to use --epochs (got {self.max_steps})")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ConfigError(f"--epochs must be > 0 (got {self.epochs})")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1 (got {self.limit})")
        if self.save_every < 0:
            raise ConfigError(f"--save-every must be >= 0 (got {self.save_every})")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1 (got {self.keep_checkpoints})")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"--lora-alpha must be a finite number > 0 (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if not self.lora_target_modules_list():
            raise ConfigError("--lora-target-modules must name at least one module (or auto)")
        if self.merge and not self.lora:
            raise ConfigError("--merge needs --lora (a full fine-tune is saved merged already)")
        if self.resume is not None and self.overwrite:
            raise ConfigError("--overwrite cannot be combined with --resume")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{_flag(f.name)} must be one of {', '.join(choices)} "
                    f"(got {getattr(self, f.name)!r})"
                )
        # The loss family validates its own hyperparameters (names the flag and range).
        self.loss_params()

    def loss_params(self):
        from preftune.losses import LossParams

        try:
            return LossParams(
                loss=self.loss,
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                simpo_gamma=self.simpo_gamma,
                rpo_alpha=self.rpo_alpha,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def step_options(self):
        from preftune.forward import StepOptions

        return StepOptions(self.concat_forward, self.head_only, self.prefix_sharing,
                           self.autocast, self.packing)

    def lora_target_modules_list(self) -> list[str]:
        """``--lora-target-modules`` split at commas, blanks removed."""
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Fields that never change what training computes: a resumed run may change them freely.
RUN_ONLY_FIELDS = frozenset({
    "output", "overwrite", "resume", "allow_config_change", "threads", "progress", "log_every",
    "eval_every", "max_eval_pairs", "num_samples", "sample_max_new_tokens", "save_every",
    "keep_checkpoints", "on_nan", "report", "merge",
})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with YAML's safe loader; unknown keys are refused by name."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s): {', '.join(unknown)}")
    return values


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Make a TrainConfig, turning type mistakes into errors that name the flag."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    clean: dict[str, Any] = {}
    for name, value in values.items():
        clean[name] = _coerce(name, value, types[name])
    return TrainConfig(**clean)


def _coerce(name: str, value: Any, type_name: str) -> Any:
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{_flag(name)} cannot be empty")
    base = type_name.replace(" | None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{_flag(name)} expects {base}, got {value!r}")
