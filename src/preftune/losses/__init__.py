"""The DPO loss family as pure functions of sequence log-probs, chosen from a registry.

- ``quantities``: the steps of the DPO derivation (Bradley-Terry probability, optimal
  policy, implicit reward, gradient weight) and length normalization.
- ``reference_based``: sigmoid (DPO, cDPO), robust (rDPO), ipo, hinge, kto_pair.
- ``reference_free``: simpo, orpo, ref_free.
- ``registry``: ``LossParams``, ``LossSpec``, ``LOSSES`` and ``compute_loss``.

docs/losses.md documents every loss: formula, paper and equation, hyperparameters.
"""

from preftune.losses.quantities import (
    LossTerms,
    bradley_terry_probability,
    implicit_reward,
    length_normalized_logps,
    optimal_policy,
    preference_margin,
    sigmoid_grad_weight,
)
from preftune.losses.reference_based import (
    hinge_loss,
    ipo_loss,
    kto_pair_loss,
    robust_loss,
    sigmoid_loss,
)
from preftune.losses.reference_free import orpo_loss, ref_free_loss, simpo_loss
from preftune.losses.registry import LOSSES, LossOutput, LossParams, LossSpec, compute_loss, flag

__all__ = [
    "LOSSES",
    "LossOutput",
    "LossParams",
    "LossSpec",
    "LossTerms",
    "bradley_terry_probability",
    "compute_loss",
    "flag",
    "hinge_loss",
    "implicit_reward",
    "ipo_loss",
    "kto_pair_loss",
    "length_normalized_logps",
    "optimal_policy",
    "orpo_loss",
    "preference_margin",
    "ref_free_loss",
    "robust_loss",
    "sigmoid_grad_weight",
    "sigmoid_loss",
    "simpo_loss",
]
