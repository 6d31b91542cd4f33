"""The loss registry, its hyperparameters, and the one entry point the trainer calls.

Choosing a loss is a lookup in ``LOSSES``; each entry knows whether it needs a reference
model and response lengths, and which ``LossParams`` fields it reads. ``compute_loss``
gathers exactly those inputs, calls the pure loss function, and adds the optional NLL term
on the chosen response.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from preftune.losses.quantities import LossTerms, length_normalized_logps
from preftune.losses.reference_based import (
    hinge_loss,
    ipo_loss,
    kto_pair_loss,
    robust_loss,
    sigmoid_loss,
)
from preftune.losses.reference_free import orpo_loss, ref_free_loss, simpo_loss


@dataclass(frozen=True)
class LossSpec:
    """One entry of the registry.

    ``hyperparameters`` names the ``LossParams`` fields passed to ``fn`` as keywords;
    ``rpo_alpha`` applies to every loss and is never listed.
    """

    name: str
    fn: Callable[..., LossTerms]
    needs_reference: bool
    hyperparameters: tuple[str, ...]
    summary: str
    needs_lengths: bool = False


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            name="sigmoid",
            fn=sigmoid_loss,
            needs_reference=True,
            hyperparameters=("beta", "label_smoothing"),
            summary="DPO, -log sigmoid(beta h) (Rafailov et al. 2023, eq. 7); "
            "cDPO when label_smoothing > 0",
        ),
        LossSpec(
            name="robust",
            fn=robust_loss,
            needs_reference=True,
            hyperparameters=("beta", "label_smoothing"),
            summary="rDPO, DPO de-biased for labels flipped at rate label_smoothing "
            "(Chowdhury et al. 2024, §3)",
        ),
        LossSpec(
            name="ipo",
            fn=ipo_loss,
            needs_reference=True,
            needs_lengths=True,
            hyperparameters=("beta",),
            summary="IPO, (h - 1/(2 beta))^2 on per-token log-ratios (Azar et al. 2023, §5.2)",
        ),
        LossSpec(
            name="hinge",
            fn=hinge_loss,
            needs_reference=True,
            hyperparameters=("beta",),
            summary="hinge max(0, 1 - beta h) (SLiC, Zhao et al. 2023; RSO, Liu et al. 2024)",
        ),
        LossSpec(
            name="kto_pair",
            fn=kto_pair_loss,
            needs_reference=True,
            hyperparameters=("beta",),
            summary="KTO, chosen response desirable, rejected one undesirable "
            "(Ethayarajh et al. 2024, §4.1)",
        ),
        LossSpec(
            name="simpo",
            fn=simpo_loss,
            needs_reference=False,
            needs_lengths=True,
            hyperparameters=("beta", "simpo_gamma"),
            summary="SimPO, per-token rewards and target margin gamma (Meng et al. 2024, eq. 6)",
        ),
        LossSpec(
            name="orpo",
            fn=orpo_loss,
            needs_reference=False,
            needs_lengths=True,
            hyperparameters=("beta",),
            summary="ORPO odds-ratio term weighted by beta; --rpo-alpha 1 adds its SFT term "
            "(Hong et al. 2024, eq. 6-7)",
        ),
        LossSpec(
            name="ref_free",
            fn=ref_free_loss,
            needs_reference=False,
            hyperparameters=("beta",),
            summary="DPO without the reference: nothing stops both log-probs collapsing",
        ),
    )
}


def flag(name: str) -> str:
    """The command-line flag of a ``LossParams`` field, e.g. ``--label-smoothing``."""
    return "--" + name.replace("_", "-")


def _help(default: float | str, text: str) -> float | str:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class LossParams:
    """Which loss to use and its hyperparameters; validated on construction.

    Raises:
        ValueError: naming the flag and its accepted range when a value is out of range, or
            when a hyperparameter is set away from its default for a loss that ignores it.
        TypeError: naming the flag when a hyperparameter is not a number.
    """

    loss: str = _help("sigmoid", "loss from the DPO family: " + ", ".join(LOSSES))
    beta: float = _help(
        0.1,
        "scale of the implicit reward; for reference-based losses the strength of the KL "
        "anchor to the reference (larger stays closer); > 0",
    )
    label_smoothing: float = _help(
        0.0,
        "probability epsilon that a preference label is flipped: cDPO for sigmoid, the flip "
        "rate for robust; [0, 0.5)",
    )
    simpo_gamma: float = _help(
        0.5,
        "SimPO target reward margin gamma, in units of beta times per-token log-prob; "
        "SimPO wants a much larger beta than DPO (around 2); >= 0",
    )
    rpo_alpha: float = _help(
        0.0,
        "weight of the per-token NLL of the chosen response added to any loss (RPO; "
        "the SFT term of ORPO at 1); 0 turns it off; >= 0",
    )

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(
                f"--loss: unknown loss {self.loss!r}; known losses: {', '.join(sorted(LOSSES))}"
            )
        for name in ("beta", "label_smoothing", "simpo_gamma", "rpo_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{flag(name)} must be a number (got {value!r})")
            if not math.isfinite(value):
                raise ValueError(f"{flag(name)} must be a finite number (got {value})")
        if not self.beta > 0:
            raise ValueError(
                f"--beta must be > 0 (got {self.beta}); beta -> 0 removes the KL anchor to the "
                "reference model, so nothing would keep the policy near it"
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing}); at 0.5 "
                "labels are coin flips and the robust loss would divide by 1 - 2 * 0.5 = 0"
            )
        if self.simpo_gamma < 0:
            raise ValueError(
                f"--simpo-gamma must be >= 0 (got {self.simpo_gamma}); it is the margin the "
                "chosen reward must beat the rejected one by"
            )
        if self.rpo_alpha < 0:
            raise ValueError(
                f"--rpo-alpha must be >= 0 (got {self.rpo_alpha}); it weights the NLL of the "
                "chosen response, 0 turns it off"
            )
        spec = LOSSES[self.loss]
        for f in dataclasses.fields(self):
            ignored = f.name not in spec.hyperparameters and f.name not in ("loss", "rpo_alpha")
            if ignored and getattr(self, f.name) != f.default:
                users = [s.name for s in LOSSES.values() if f.name in s.hyperparameters]
                raise ValueError(
                    f"{flag(f.name)} {getattr(self, f.name)} has no effect with --loss "
                    f"{self.loss}; it is used by: {', '.join(users)}"
                )


@dataclass
class LossOutput:
    """What ``compute_loss`` returns. Every tensor has shape (batch,).

    ``losses`` is differentiable; the rest is detached. ``components`` holds
    ``"preference"`` (the loss before the NLL term) and, whenever lengths are given,
    ``"nll"`` (the per-token NLL of the chosen response, unweighted; it enters ``losses``
    as rpo_alpha * nll).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    components: dict[str, Tensor]


def compute_loss(
    params: LossParams,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Per-pair loss of the configured loss, plus rpo_alpha * NLL of the chosen response.

    The NLL term (Pang et al. 2024, "Iterative Reasoning Preference Optimization", §2) is
    -policy_chosen_logps / chosen_lengths: the mean per-token NLL over the response, with
    lengths below 1 clamped to 1. (That paper normalizes by prompt plus response length;
    here the prompt is not part of the sequence log-prob.)

    Shape: every tensor (batch,); lengths may be integer or float tensors.

    Raises:
        ValueError: if the loss needs reference log-probs or lengths that are None, or if the
            tensors are not 1-D of one shape.
    """
    spec = LOSSES[params.loss]
    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }
    given = {name: t for name, t in tensors.items() if t is not None}
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    if any(len(s) != 1 or s != shapes["policy_chosen_logps"] for s in shapes.values()):
        raise ValueError(f"every tensor must have the same shape (batch,); got {shapes}")

    needed = ["policy_chosen_logps", "policy_rejected_logps"]
    if spec.needs_reference:
        needed += ["reference_chosen_logps", "reference_rejected_logps"]
    if spec.needs_lengths:
        needed += ["chosen_lengths", "rejected_lengths"]
    missing = [name for name in needed if name not in given]
    if missing:
        free = [s.name for s in LOSSES.values() if not s.needs_reference]
        raise ValueError(
            f"loss {spec.name!r} needs {' and '.join(missing)}, got None; reference-free "
            f"losses are: {', '.join(free)}"
        )
    if params.rpo_alpha > 0 and chosen_lengths is None:
        raise ValueError(f"rpo_alpha={params.rpo_alpha} needs chosen_lengths, got None")

    hyperparameters = {name: getattr(params, name) for name in spec.hyperparameters}
    preference, chosen_rewards, rejected_rewards = spec.fn(
        **{name: given[name] for name in needed}, **hyperparameters
    )
    losses = preference
    components = {"preference": preference.detach()}
    if chosen_lengths is not None:
        nll = -length_normalized_logps(policy_chosen_logps, chosen_lengths)
        components["nll"] = nll.detach()
        if params.rpo_alpha > 0:
            losses = preference + params.rpo_alpha * nll
    return LossOutput(losses, chosen_rewards, rejected_rewards, components)
