"""Opening a trained run, or any model, as a policy and its reference for inspection.

A run directory written by ``preftune train`` holds the trained policy in ``model/`` and the
resolved configuration in ``config.yaml``. Its ``model`` field names the reference (the model
training started from, which training froze as its reference), and its loss, beta and
tokenization settings are the ones scoring must reuse for the numbers to mean the same thing.
Flags given by the user (``--reference``, ``--beta``) win over the run's values.

A ``--lora`` run's ``model/`` holds an adapter: the policy is the run's base with that adapter,
and the reference is the same model with the adapter off (or, when training continued an
adapter, with the starting adapter in its place), so the base weights are loaded once.

Any other model spec (hub id, folder, .gguf file, alias, LoRA adapter folder) can be opened
too; it has no run to take a reference from, so one must be named.

The policy and the reference must read text the same way: their tokenizers must have the same
vocabulary and the same special tokens, or the two log-probs of one response would be
log-probs of different token sequences and their difference would mean nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn

from preftune import lora, models
from preftune.config import TrainConfig, build_config, field_names
from preftune.data.pipeline import prepare_data
from preftune.data.report import DataReport
from preftune.data.sources import load_pairs
from preftune.data.tokenize import PairTokenizer, TokenizedPair, tokenize_pairs
from preftune.forward import StepOptions
from preftune.losses import LOSSES, LossParams

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MODEL_FOLDER = "model"


@dataclass
class OpenedRun:
    """A policy, its reference and the settings that scoring them needs."""

    policy: nn.Module
    reference: nn.Module
    tokenizer: object
    params: LossParams  # the run's loss and beta, with --beta applied
    max_length: int
    chat_template: str
    policy_spec: str
    reference_spec: str
    config: TrainConfig | None  # the run's resolved config; None for a bare model spec
    step_options: StepOptions = field(default_factory=StepOptions)  # layout of a forward pass
    precompute_reference: bool = False  # reference log-probs in one pass first, as in training

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def needs_reference(self) -> bool:
        """Whether the run's loss compares against the reference (DPO does; SimPO does not)."""
        return LOSSES[self.params.loss].needs_reference

    @property
    def loss_reference(self) -> nn.Module | None:
        """The reference as the loss sees it: None for reference-free losses, as in training."""
        return self.reference if self.needs_reference else None

    def pair_tokenizer(self) -> PairTokenizer:
        """Tokenization with the run's own settings (chat template, max length)."""
        return PairTokenizer(self.tokenizer, self.max_length, self.chat_template)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_run_config(run_dir: Path) -> TrainConfig:
    """The resolved TrainConfig a run saved; keys this version does not know are ignored.

    Raises:
        ValueError: the file is not a mapping of config keys, or a value is out of range.
    """
    path = run_dir / CONFIG_FILE
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        # A bad file, not a bad argument: ValueError is what the CLI reports as a user error.
        raise ValueError(f"{path}: expected a mapping of config keys")  # noqa: TRY004
    known = set(field_names())
    unknown = sorted(set(values) - known)
    if unknown:
        log.warning("%s: ignoring keys this preftune does not know: %s", path, ", ".join(unknown))
    return build_config({k: v for k, v in values.items() if k in known})


def open_run(
    spec: str,
    reference: str | None = None,
    beta: float | None = None,
) -> OpenedRun:
    """Load a run directory (or a model spec with ``reference``) for scoring.

    Args:
        spec: A run directory written by ``preftune train``, or any model spec.
        reference: Reference model spec; default: the run's ``model``. Required for a model
            spec that is not a run directory.
        beta: Implicit-reward scale; default: the run's ``beta`` (0.1 for a bare model).

    Raises:
        ValueError: an unknown run directory or model, a run without its trained model, a
            missing reference, or a policy and reference whose tokenizers differ.
    """
    path = Path(spec).expanduser()
    config = None
    if is_run_dir(path):
        config = read_run_config(path)
        policy_spec = str(path / MODEL_FOLDER)
        trained = path / MODEL_FOLDER
        if not ((trained / "config.json").is_file() or (trained / models.ADAPTER_CONFIG).is_file()):
            raise ValueError(
                f"run directory {spec} has no trained model in {MODEL_FOLDER}/ "
                "(did training finish?)"
            )
        reference_spec = reference or config.model
        params = config.loss_params()
        max_length, chat_template = config.max_length, config.chat_template
        dtype, trust_remote_code = config.dtype, config.trust_remote_code
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(
                f"{spec}: neither a run directory (no {CONFIG_FILE}) nor a model folder "
                "(no config.json)"
            )
        _check_model_spec(spec)
        if reference is None and not path.exists():
            raise ValueError(
                f"{spec}: no such run directory; to score a model (hub id, .gguf, alias) "
                "instead, pass --reference SPEC as well"
            )
        if reference is None:
            raise ValueError(
                f"{spec} is a model, not a run directory: pass --reference SPEC (the model "
                "it was trained from) to score it against"
            )
        policy_spec, reference_spec = spec, reference
        defaults = TrainConfig()
        params = defaults.loss_params()
        max_length, chat_template = defaults.max_length, defaults.chat_template
        dtype, trust_remote_code = defaults.dtype, defaults.trust_remote_code
    if beta is not None:
        params = dataclasses.replace(params, beta=beta)

    if config is not None and reference is None and models.resolve(policy_spec).kind == "adapter":
        log.info("loading policy %s on its base; reference %s", policy_spec, reference_spec)
        policy, tokenizer, ref_model = lora.load_with_reference(
            policy_spec, reference_spec, dtype, trust_remote_code
        )
    else:
        log.info("loading policy %s", policy_spec)
        policy, tokenizer = models.load(policy_spec, dtype=dtype,
                                        trust_remote_code=trust_remote_code)
        log.info("loading reference %s", reference_spec)
        try:
            ref_model, ref_tokenizer = models.load(
                reference_spec, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except models.ModelError as err:
            where = "--reference" if reference else f"the run's {CONFIG_FILE} 'model'"
            raise ValueError(f"reference from {where}: {err}") from None
        check_same_tokenizer(tokenizer, ref_tokenizer, policy_spec, reference_spec)
    for model in (policy, ref_model):
        model.eval()
        model.requires_grad_(False)
    return OpenedRun(
        policy,
        ref_model,
        tokenizer,
        params,
        max_length,
        chat_template,
        policy_spec,
        reference_spec,
        config,
        config.step_options() if config else StepOptions(),
        bool(config and config.precompute_reference),
    )


def check_same_tokenizer(
    policy_tokenizer, reference_tokenizer, policy_spec: str, reference_spec: str
) -> None:
    """Refuse a policy and reference that would turn one text into different token ids.

    Raises:
        ValueError: naming what differs (vocabulary, or which special token).
    """
    pair = f"policy {policy_spec} and reference {reference_spec}"
    vocab_a, vocab_b = policy_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    if vocab_a != vocab_b:
        only_a, only_b = len(set(vocab_a) - set(vocab_b)), len(set(vocab_b) - set(vocab_a))
        raise ValueError(
            f"{pair} have different tokenizers: vocabularies of {len(vocab_a)} and "
            f"{len(vocab_b)} tokens ({only_a} only in the policy's, {only_b} only in the "
            "reference's, the rest may map to other ids)"
        )
    for name in ("bos_token", "eos_token", "unk_token"):
        a, b = getattr(policy_tokenizer, name), getattr(reference_tokenizer, name)
        if a != b:
            raise ValueError(f"{pair} have different tokenizers: {name} {a!r} vs {b!r}")
    # Which token pads is irrelevant (padding is masked out); every other special token counts.
    specials_a, specials_b = _special_tokens(policy_tokenizer), _special_tokens(reference_tokenizer)
    if specials_a != specials_b:
        raise ValueError(
            f"{pair} have different tokenizers: special tokens "
            f"{sorted(specials_a - specials_b)} only in the policy's, "
            f"{sorted(specials_b - specials_a)} only in the reference's"
        )


def eval_pairs(
    run: OpenedRun, data: str | None, report: DataReport, limit: int | None = None
) -> list[TokenizedPair]:
    """Preference pairs to evaluate, tokenized with the run's settings.

    With ``data`` None, the run's own held-out pairs, rebuilt by the same ``prepare_data``
    training used: the demo's eval file for ``data: demo``, the run's ``eval_data``, or the
    seeded ``eval_fraction`` split of its training data. Otherwise the pairs of ``data``;
    unusable records are skipped and listed in ``report``.

    Raises:
        ValueError: no data given for a bare model, or no usable pair.
    """
    if data is None:
        if run.config is None:
            raise ValueError(f"{run.policy_spec} is not a run directory: pass --data FILE")
        _, pairs = prepare_data(run.config, run.tokenizer, report)
    else:
        pairs = tokenize_pairs(
            load_pairs(data, report=report, limit=limit), run.pair_tokenizer(), report
        )
    pairs = pairs[:limit] if limit is not None else pairs
    if not pairs and data is None:
        raise ValueError(
            f"{run.policy_spec}: the run held out no pairs (eval_fraction 0 and "
            "no eval_data); pass --data FILE"
        )
    if not pairs:
        raise ValueError(f"{data or run.policy_spec}: no usable preference pair to evaluate")
    return pairs


def _special_tokens(tokenizer) -> set[str]:
    named = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token}
    return set(tokenizer.all_special_tokens) - ({tokenizer.pad_token} - named)


def _check_model_spec(spec: str) -> None:
    """Fail early, before loading anything, on a spec that names no run and no model."""
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ValueError(f"{spec}: no such run directory or model")
    models.resolve(spec)
