"""LoRA training through peft: the adapter, the reference as the same model, saving and merging.

With ``--lora`` the policy is the loaded model with trainable low-rank adapters (Hu et al.
2021, "LoRA", eq. 3: W x + (alpha / r) B A x) on the chosen projections; every base weight is
frozen. DPO needs the reference's log-probs too, and for a LoRA policy the reference is the
policy's own base, so no second copy of the weights is made: :class:`AdapterReference` is a
view of the policy that switches its adapter off for the length of each call (peft's
``disable_adapter``).

When training continues from an adapter (``--model`` is a folder with
``adapter_config.json``), the reference is that adapter as it was loaded, not the bare base:
the folder is loaded twice into the same model, once as the trainable adapter ``default``
and once, frozen, as ``reference``, and reference passes make ``reference`` the active
adapter. Only the adapter weights exist twice, never the base's.

Saving writes the trained adapter (``default`` only) to ``RUN/model``; ``--merge`` also
writes the merged full model. Checkpoints hold the adapter weights only (see
:func:`trainable_state`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from preftune import models

log = logging.getLogger(__name__)

POLICY_ADAPTER = "default"  # peft's name for the first adapter of a model
REFERENCE_ADAPTER = "reference"
# Every attention and MLP projection of Llama-style blocks (Llama, Mistral, Qwen2, SmolLM,
# Gemma, ...): adapting all of them rather than q and v alone is the common choice for
# preference tuning; only the names a model has are used.
LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# GPT-2's fused qkv projection, its attention and MLP output projections, its MLP input.
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def target_modules(model: nn.Module, requested: list[str]) -> list[str] | str | None:
    """The module names to adapt; None leaves the choice to peft's per-architecture table.

    ``requested`` is ``--lora-target-modules`` split at commas: ``["auto"]``,
    ``["all-linear"]`` (peft's own keyword) or explicit names.
    """
    if requested == ["all-linear"]:
        return "all-linear"
    if requested != ["auto"]:
        return requested
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if getattr(model.config, "model_type", None) == "gpt2":
        return list(GPT2_TARGETS)
    if {"q_proj", "v_proj"} <= leaves:
        return [name for name in LLAMA_STYLE_TARGETS if name in leaves]
    return None


def add_adapter(model: nn.Module, r: int, alpha: float, dropout: float,
                requested: list[str]) -> nn.Module:
    """Wrap ``model`` with a fresh trainable LoRA adapter; the base weights are frozen.

    B starts at zero (peft's default), so the wrapped model computes exactly what ``model``
    did and the first DPO step sits at loss ln 2.

    Raises:
        ValueError: no module of the model matches the target names.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, requested)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
        task_type="CAUSAL_LM",
        # GPT-2 stores its projections as Conv1D, weights transposed.
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"--lora-target-modules: {err}") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters of %d (%.2f%%)", r, alpha,
             ",".join(sorted(wrapped.peft_config[POLICY_ADAPTER].target_modules)), trainable,
             total, 100 * trainable / total)
    return wrapped


def load_adapter_for_training(folder: str, dtype: str = "float32",
                              trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """The adapter in ``folder`` on its base, trainable, plus a frozen copy as the reference.

    Returns ``(model, tokenizer)`` with adapters ``default`` (trainable, active) and
    ``reference`` (frozen), both loaded from ``folder``.
    """
    from peft import PeftModel

    base, tokenizer = models.load(models.adapter_base(folder), dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    tokenizer = models.adapter_tokenizer(folder, tokenizer)
    model = PeftModel.from_pretrained(base, folder, adapter_name=POLICY_ADAPTER,
                                      is_trainable=True)
    model.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(POLICY_ADAPTER)
    models.disable_dropout(model)
    log.info("continuing the LoRA adapter %s (r=%d); the reference is the adapter as loaded",
             folder, model.peft_config[POLICY_ADAPTER].r)
    return model, tokenizer


def load_with_reference(folder: str, reference_spec: str, dtype: str = "float32",
                        trust_remote_code: bool = False) -> tuple[nn.Module, object, nn.Module]:
    """A trained adapter on its base, frozen, and its reference as a view of the same model.

    ``reference_spec`` is what training started from: the base (the reference is the model
    with the adapter off) or an adapter folder (loaded beside it as ``reference``).

    Returns ``(policy, tokenizer, reference)``.
    """
    from peft import PeftModel

    base, tokenizer = models.load(models.adapter_base(folder), dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    tokenizer = models.adapter_tokenizer(folder, tokenizer)
    model = PeftModel.from_pretrained(base, folder, adapter_name=POLICY_ADAPTER)
    if models.resolve(reference_spec).kind == "adapter":
        model.load_adapter(reference_spec, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(POLICY_ADAPTER)
    model.requires_grad_(False)
    return model, tokenizer, reference_of(model)


class AdapterReference(nn.Module):
    """The reference model as a view of a LoRA policy: the policy's adapter off for each call.

    With ``adapter`` None the reference is the base model (peft's ``disable_adapter``);
    with a name, that frozen adapter is made active for the call instead. The view owns no
    weights: its parameters are the policy's, and ``requires_grad_`` leaves them alone.
    Modes follow the policy (``eval()`` on the view puts the policy in eval mode).
    """

    def __init__(self, policy: nn.Module, adapter: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: no second registration
        self.adapter = adapter

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this block the policy computes the reference's outputs."""
        if self.adapter is None:
            with self.policy.disable_adapter():
                yield
            return
        # set_adapter also flips requires_grad; the policy's flags are put back afterwards.
        flags = [(p, p.requires_grad) for p in self.policy.parameters()]
        self.policy.set_adapter(self.adapter, inference_mode=True)
        try:
            yield
        finally:
            self.policy.set_adapter(POLICY_ADAPTER)
            for param, flag in flags:
                param.requires_grad_(flag)

    def forward(self, *args, **kwargs):
        with self.active():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.active():
            return self.policy.generate(*args, **kwargs)

    def get_decoder(self):
        return _Switched(self, self.policy.get_decoder())

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    @property
    def config(self):
        """The policy's config: the same model, so the same attention implementation."""
        return self.policy.config

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)

    def state_dict(self, *args, **kwargs):
        """The reference's weights: the policy's without its trained adapter."""
        marker = f".{POLICY_ADAPTER}."
        return {k: v for k, v in self.policy.state_dict(*args, **kwargs).items()
                if marker not in k}

    def requires_grad_(self, requires_grad: bool = True) -> AdapterReference:
        return self

    def train(self, mode: bool = True) -> AdapterReference:
        self.policy.train(mode)
        return self

    @property
    def training(self) -> bool:
        policy = self.__dict__.get("policy")
        return policy.training if policy is not None else False

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # nn.Module.__init__ sets it; the mode is the policy's


class _Switched:
    """The policy's decoder, called with the reference's adapter setting."""

    def __init__(self, reference: AdapterReference, body: nn.Module) -> None:
        self.reference = reference
        self.body = body

    def __call__(self, *args, **kwargs):
        with self.reference.active():
            return self.body(*args, **kwargs)


def reference_of(policy: nn.Module) -> AdapterReference:
    """The reference for a LoRA policy: its starting adapter if it has one, else its base."""
    adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in policy.peft_config else None
    return AdapterReference(policy, adapter)


# Checkpoints and saving


def trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter's weights by parameter name (what a checkpoint holds)."""
    return {name: p.detach() for name, p in policy.named_parameters() if p.requires_grad}


def load_trainable_state(policy: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed adapter weights into ``policy``.

    Raises:
        ValueError: the names differ from the policy's trainable parameters (another rank,
            other target modules).
    """
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing = sorted(params.keys() - tensors.keys())[:3]
        extra = sorted(tensors.keys() - params.keys())[:3]
        raise ValueError(f"adapter weights do not match the model (missing {missing}, "
                         f"unexpected {extra})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def save_adapter(policy: nn.Module, folder: Path, base_spec: str) -> None:
    """Write the trained adapter to ``folder``; its config names ``base_spec`` as the base."""
    config = policy.peft_config[POLICY_ADAPTER]
    path = Path(base_spec).expanduser()
    config.base_model_name_or_path = str(path.resolve()) if path.exists() else base_spec
    # Embeddings are never adapted; saying so keeps peft from looking the base up on the hub.
    policy.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER],
                           save_embedding_layers=False)


def save_merged(policy: nn.Module, folder: Path) -> None:
    """Write the base with the trained adapter merged in, as a plain transformers model.

    Merging changes the policy's base weights in place, so this is the last use of it.
    """
    merged = policy.merge_and_unload(adapter_names=[POLICY_ADAPTER])
    merged.save_pretrained(folder)


def base_spec(model_spec: str) -> str:
    """The base model a ``--model`` spec stands on (itself, unless it is an adapter)."""
    if models.resolve(model_spec).kind == "adapter":
        return models.adapter_base(model_spec)
    return model_spec
