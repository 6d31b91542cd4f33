"""Precomputed reference log-probs: one pass before training, cached on disk.

The reference model is frozen, so its log-probs of a pair never change during training.
Computing them once, before the first step, removes a forward pass from every step of every
epoch and lets the reference model be freed while the policy trains. The values are stored
on each :class:`TokenizedPair` (so shuffling and epochs cannot misalign them) and cached
under ``<cache>/reference_logps/<key>.safetensors``. The key hashes the reference weights,
every pair's token ids (which capture the data and the tokenization settings), the dtype
and whether the forward ran under autocast, so any change to those computes them afresh.

The reference may be a view of a LoRA policy with its adapter off
(:class:`preftune.lora.AdapterReference`); its weights, and so its cache key, are the
base's (plus the starting adapter's, when training continues one).

Under several processes (:mod:`preftune.distributed`) each process computes an equal share
of the pairs and the shares are gathered, so every process holds all the values; process 0
alone writes the cache, and all processes agree on whether it was a hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from preftune.data.tokenize import TokenizedPair
from preftune.distributed import Engine
from preftune.forward import StepOptions, layout, model_logps
from preftune.models import cache_dir

log = logging.getLogger(__name__)


def weights_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(weights: str, pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256(weights.encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
    return digest.hexdigest()[:32]


def computed_by(weights: str, options: StepOptions, batch_size: int,
                world_size: int = 1) -> str:
    """The weights' digest with how values are computed from them, for the cache key.

    Autocast gives other values than the same weights without it. Batching and layout only
    move float noise (about 1e-6 relative), but a run that batches as the cached values were
    computed gets them bit for bit, so a policy equal to its reference has rewards of
    exactly 0 instead of noise that can tip near-ties at step 0.
    """
    return f"{weights}|{batch_size} x {world_size}|{options}"  # options name autocast too


def compute_reference_logps(
    reference: nn.Module, pairs: list[TokenizedPair], pad_id: int, batch_size: int,
    options: StepOptions = StepOptions(), progress: bool = False,
) -> torch.Tensor:
    """Reference log-probs of every pair. Shape: (num_pairs, 2), columns chosen, rejected."""
    out = torch.empty(len(pairs), 2)
    # Longest first in batches of similar length: less padding, same values.
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].num_tokens)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch", leave=False)
    was_training = reference.training
    reference.eval()
    with torch.no_grad():
        for start in starts:
            idx = order[start : start + batch_size]
            chunk = [pairs[i] for i in idx]
            logps = model_logps(reference, layout(reference, chunk, pad_id, options), options)
            out[idx, 0] = logps[: len(idx)].cpu()
            out[idx, 1] = logps[len(idx) :].cpu()
    reference.train(was_training)
    return out


def attach_reference_logps(
    reference: nn.Module, pair_sets: list[list[TokenizedPair]], pad_id: int, batch_size: int,
    options: StepOptions = StepOptions(), use_cache: bool = True, progress: bool = False,
    engine: Engine | None = None,
) -> list[list[TokenizedPair]]:
    """Return each list of pairs with its reference log-probs attached (cached on disk)."""
    engine = engine or Engine()
    weights = weights_digest(reference) if use_cache and not engine.sharded else ""
    weights = computed_by(weights, options, batch_size, engine.world_size)
    # TODO: under FSDP/ZeRO-3 a process holds a shard of the weights, so there is no digest
    # to key the cache with; the values are computed afresh every run.
    use_cache = use_cache and not engine.sharded
    out = []
    for pairs in pair_sets:
        if not pairs:
            out.append(pairs)
            continue
        path = cache_dir() / "reference_logps" / f"{cache_key(weights, pairs)}.safetensors"
        values = _read_cache(path, len(pairs)) if use_cache else None
        if engine.any(values is None):  # every process computes, or none does
            share, _ = engine.shard(pairs)
            values = compute_reference_logps(reference, share, pad_id, batch_size, options,
                                             progress)
            values = engine.gather(values)[: len(pairs)]  # (num_pairs, 2)
            if use_cache and engine.is_main:
                _write_cache(path, values)
        else:
            log.info("reference log-probs of %d pairs read from %s", len(pairs), path)
        out.append([
            dataclasses.replace(p, reference_logps=(float(v[0]), float(v[1])))
            for p, v in zip(pairs, values)
        ])
    return out


def _read_cache(path: Path, num_pairs: int) -> torch.Tensor | None:
    try:
        values = load_file(path)["reference_logps"]
    except (OSError, KeyError, ValueError, RuntimeError):
        return None  # absent or unreadable: computed again
    if values.shape != (num_pairs, 2) or not torch.isfinite(values).all():
        return None
    return values


def _write_cache(path: Path, values: torch.Tensor) -> None:
    """Written beside the target and renamed, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"reference_logps": values.contiguous()}, tmp)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache reference log-probs at %s (%s)", path, err)
