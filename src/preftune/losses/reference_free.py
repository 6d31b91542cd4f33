"""Losses that need no reference model: they score the policy's log-probs alone.

Each is a pure function of the policy's sequence log-probs (and, for the length-normalized
ones, the response lengths), all of shape (batch,). With no reference there is no implicit
reward beta * log(pi / pi_ref); each loss reports the analogue it optimizes instead:

- ``ref_free``: beta * log pi(y), the DPO reward with log pi_ref set to 0.
- ``simpo`` and ``orpo``: beta * (log pi(y) / |y|), beta times the mean per-token log-prob
  (SimPO's own reward, Meng et al. 2024, eq. 4; ORPO's odds are built on the same mean).

Where the code departs from a paper:

- ``orpo`` returns only the odds-ratio term lambda * L_OR of Hong et al. 2024 (eq. 6), with
  lambda = beta. The paper's SFT term is the per-token NLL of the chosen response, which
  every loss of this package adds when rpo_alpha > 0: rpo_alpha = 1 gives the paper's full
  objective.
- Mean log-probs that reach 0 (a response of probability 1) would make ORPO's odds infinite;
  they are clamped to at most -eps of their dtype, so the log-odds stay finite.
- Lengths below 1 (empty responses) are clamped to 1 by ``length_normalized_logps``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.quantities import LossTerms, length_normalized_logps


def ref_free_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossTerms:
    """DPO with the reference removed: -log sigmoid(beta * (log pi(y_w) - log pi(y_l))).

    Rafailov et al. 2023, eq. 7 with log pi_ref = 0. Nothing anchors the policy: the loss
    falls just as well when both log-probs drop, as long as the rejected one drops faster,
    so the chosen log-prob (``logps/chosen``) typically collapses along with the rejected one.
    It is kept as the counter-example that shows what the reference is for.

    Shape: (batch,) for every tensor in and out.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps)
    losses = -F.logsigmoid(logits)
    return losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach()


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    simpo_gamma: float,
) -> LossTerms:
    """SimPO: -log sigmoid(beta * mean logp(y_w) - beta * mean logp(y_l) - gamma).

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6, with gamma = simpo_gamma the target reward margin: the chosen response's
    reward must beat the rejected one's by gamma before the loss flattens. Lengths below 1
    are clamped to 1.

    Shape: (batch,) for every tensor in and out.
    """
    chosen_rewards = beta * length_normalized_logps(policy_chosen_logps, chosen_lengths)
    rejected_rewards = beta * length_normalized_logps(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) for p = exp(mean_logps), computed without leaving log space.

    log(1 - exp(x)) uses expm1 near 0 and log1p far from it (the two accurate regimes of
    log1mexp); x is clamped to at most -eps so p < 1.

    Shape: (batch,) in, (batch,) out.
    """
    x = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    log1mexp = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1mexp


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> LossTerms:
    """ORPO's odds-ratio term: -beta * log sigmoid(log odds(y_w) - log odds(y_l)).

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eq. 7 (L_OR), weighted by lambda = beta as in eq. 6. odds(y) = P / (1 - P) with
    P = exp(mean per-token log-prob of y). Add the paper's SFT term with rpo_alpha = 1.

    Shape: (batch,) for every tensor in and out.
    """
    chosen_mean = length_normalized_logps(policy_chosen_logps, chosen_lengths)
    rejected_mean = length_normalized_logps(policy_rejected_logps, rejected_lengths)
    losses = -beta * F.logsigmoid(_log_odds(chosen_mean) - _log_odds(rejected_mean))
    return losses, (beta * chosen_mean).detach(), (beta * rejected_mean).detach()
