"""Losses that compare the policy with a frozen reference model.

Each is a pure function of four sequence log-probs of shape (batch,) and returns per-pair
losses with the detached implicit rewards beta * (policy_logps - reference_logps)
(Rafailov et al. 2023, eq. 5, without the beta * log Z term that cancels in every pair).

Where the code departs from a paper:

- ``ipo`` applies the IPO square loss to length-normalized log-ratios (each log-ratio
  divided by its response length) instead of summed ones. IPO regresses the margin onto the
  constant 1 / (2 * beta); on summed log-ratios that target means "0.1 nats apart in total"
  whether a response has 5 tokens or 500, so long pairs meet it with a negligible per-token
  change while short pairs must move a lot, and the squared error of long pairs (whose
  summed log-ratios are large) dominates the batch. Per-token log-ratios give every pair the
  same target scale. The rewards stay the summed implicit rewards, like every other loss.
- ``kto_pair`` uses one desirable and one undesirable example per pair. Its reference point
  z0, which the KTO paper estimates from mismatched pairs across a batch, is here the
  detached mean of the pair's two log-ratios, clamped at 0 (a KL divergence is never
  negative). This keeps the loss a function of one pair, so it does not change with batch
  size or gradient accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.quantities import (
    LossTerms,
    implicit_reward,
    length_normalized_logps,
    preference_margin,
)


def _implicit_rewards(
    beta: float,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    chosen_rewards = implicit_reward(beta, policy_chosen_logps, reference_chosen_logps)
    rejected_rewards = implicit_reward(beta, policy_rejected_logps, reference_rejected_logps)
    return chosen_rewards.detach(), rejected_rewards.detach()


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossTerms:
    """DPO: -log sigmoid(beta * h), or its conservative form cDPO when label_smoothing > 0.

    DPO (Rafailov et al. 2023, eq. 7): L = -log sigmoid(beta * h), where h is the margin of
    log-ratios (``preference_margin``). cDPO (Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO") assumes each label is flipped with probability
    epsilon = label_smoothing and takes the expected loss over the label:
    L = -(1 - epsilon) * log sigmoid(beta * h) - epsilon * log sigmoid(-beta * h).
    Written with logsigmoid, it stays finite for any finite margin.

    Shape: (batch,) for every tensor in and out.
    """
    logits = beta * preference_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, *_implicit_rewards(
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossTerms:
    """rDPO: the DPO loss de-biased for labels flipped at rate epsilon = label_smoothing.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback", §3: with l(h) = -log sigmoid(beta * h) the DPO loss,
    L = ((1 - epsilon) * l(h) - epsilon * l(-h)) / (1 - 2 * epsilon).
    Its expectation over random flips equals the DPO loss on clean labels. Unlike DPO it is
    not bounded below (a confident pair can have a negative loss), and its gradient weight
    ((1 - epsilon) * sigmoid(-beta h) + epsilon * sigmoid(beta h)) / (1 - 2 epsilon) never
    vanishes.

    Raises:
        ValueError: if label_smoothing is outside [0, 0.5), where 1 - 2 * epsilon <= 0.

    Shape: (batch,) for every tensor in and out.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (got {label_smoothing})")
    logits = beta * preference_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (
        -(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1 - 2 * label_smoothing)
    return losses, *_implicit_rewards(
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> LossTerms:
    """IPO: (h_mean - 1 / (2 * beta))^2 on length-normalized log-ratios.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", §5.2 (the sampled IPO loss, with tau = beta):
    L = (h - 1 / (2 * tau))^2. Here h is built from per-token log-ratios,
    h_mean = (pi_c - ref_c) / |y_w| - (pi_r - ref_r) / |y_l|; the module docstring says why.
    Lengths below 1 are clamped to 1.

    Raises:
        ValueError: if beta <= 0 (the target 1 / (2 * beta) would be infinite).

    Shape: (batch,) for every tensor in and out.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta})")
    h_mean = length_normalized_logps(
        policy_chosen_logps - reference_chosen_logps, chosen_lengths
    ) - length_normalized_logps(policy_rejected_logps - reference_rejected_logps, rejected_lengths)
    losses = (h_mean - 1 / (2 * beta)) ** 2
    return losses, *_implicit_rewards(
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossTerms:
    """Hinge on the reference-normalized margin: max(0, 1 - beta * h).

    The SLiC calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback", §2) is a hinge on the policy's log-likelihood margin; RSO (Liu et
    al. 2024, "Statistical Rejection Sampling Improves Preference Optimization", §3, the
    "hinge-norm" loss) measures that margin relative to the reference, as here. The gradient
    is exactly zero once beta * h >= 1: pairs past the margin stop contributing.

    Shape: (batch,) for every tensor in and out.
    """
    logits = beta * preference_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1 - logits)
    return losses, *_implicit_rewards(
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )


def kto_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossTerms:
    """KTO on a pair: the chosen response as desirable, the rejected one as undesirable.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", §4.1,
    with both loss-aversion weights lambda_D = lambda_U = 1 (a pair is balanced):
    L = (1 - sigmoid(beta * (r_w - z0))) + (1 - sigmoid(beta * (z0 - r_l))),
    where r = log(pi / pi_ref) and z0 is the reference point (module docstring: here the
    detached mean of the pair's log-ratios, clamped at 0). 1 - sigmoid(x) is written
    sigmoid(-x). The loss lies in (0, 2) and starts at 1.

    Shape: (batch,) for every tensor in and out.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    z0 = ((chosen_logratios + rejected_logratios) / 2).clamp(min=0).detach()
    losses = torch.sigmoid(-beta * (chosen_logratios - z0)) + torch.sigmoid(
        -beta * (z0 - rejected_logratios)
    )
    return losses, *_implicit_rewards(
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )
