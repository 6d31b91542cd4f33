"""The quantities every preference loss is built from.

These are the steps of the DPO derivation (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model", §4) written as functions, so
that each step can be checked numerically: the Bradley-Terry preference probability, the
closed-form optimal policy of the KL-regularized objective, the implicit reward that inverts
it, and the per-pair gradient weight of the resulting logistic loss.

Every log-prob here is a sequence log-prob: the sum of the response tokens' log-probs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (losses, chosen_rewards, rejected_rewards), each of shape (batch,); rewards are detached.
LossTerms = tuple[Tensor, Tensor, Tensor]


def bradley_terry_probability(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Probability that the chosen response is preferred, under the Bradley-Terry model.

    p(y_w > y_l) = exp(r_w) / (exp(r_w) + exp(r_l)) = sigmoid(r_w - r_l)
    (Rafailov et al. 2023, eq. 1). Only the reward difference matters, which is why a reward
    shifted by any per-prompt constant (such as beta * log Z) gives the same probability.

    Shape: any, the two tensors broadcast; the result has the broadcast shape.
    """
    return torch.sigmoid(chosen_rewards - rejected_rewards)


def implicit_reward(beta: float, policy_logps: Tensor, reference_logps: Tensor) -> Tensor:
    """The reward a policy implicitly assigns: beta * log(pi(y|x) / pi_ref(y|x)).

    Rafailov et al. 2023, eq. 5 gives r(x, y) = beta * log(pi / pi_ref) + beta * log Z(x);
    the partition term beta * log Z(x) is dropped because it cancels in every preference
    probability (see ``bradley_terry_probability``).

    Shape: (batch,) in, (batch,) out.
    """
    return beta * (policy_logps - reference_logps)


def preference_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """h = log(pi(y_w) / pi_ref(y_w)) - log(pi(y_l) / pi_ref(y_l)), the DPO log-ratio margin.

    Positive h: the policy has moved towards the chosen response relative to the reference.
    The DPO loss is -log sigmoid(beta * h) (Rafailov et al. 2023, eq. 7).

    Shape: (batch,) in, (batch,) out.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    return chosen_logratios - rejected_logratios


def sigmoid_grad_weight(beta: float, h: Tensor) -> Tensor:
    """Per-pair gradient weight of the DPO loss: sigmoid(-beta * h).

    The gradient of -log sigmoid(beta * h) is -beta * sigmoid(-beta * h) times
    (grad log pi(y_w) - grad log pi(y_l)) (Rafailov et al. 2023, §4, "What does the DPO update
    do?"). The weight is near 1 when the policy ranks the pair wrongly (h << 0) and decays to 0
    once it ranks it right (h >> 0).

    Shape: (batch,) in, (batch,) out.
    """
    return torch.sigmoid(-beta * h)


def optimal_policy(reference_probs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """The optimum of the KL-regularized reward objective over a discrete set of responses.

    pi*(y) = pi_ref(y) * exp(r(y) / beta) / Z, with Z = sum_y pi_ref(y) * exp(r(y) / beta)
    (Rafailov et al. 2023, eq. 4). Computed as a softmax of log pi_ref + r / beta, which stays
    finite for large r / beta; responses with pi_ref(y) = 0 keep probability 0.

    Shape: (..., n) in (probabilities over the last axis), (..., n) out.
    """
    return torch.softmax(torch.log(reference_probs) + rewards / beta, dim=-1)


def length_normalized_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    """Mean per-token log-prob: a sequence log-prob divided by its response length.

    Lengths below 1 (an empty response) are clamped to 1, so the result is the sequence
    log-prob itself (0 for an empty response) instead of inf or NaN.

    Shape: (batch,) in, (batch,) out. ``lengths`` may be an integer or a float tensor.
    """
    return logps / lengths.to(logps.dtype).clamp(min=1)
