"""The loss family: values worked by hand, limits, invariants and the DPO derivation.

Expected values are computed here in float64 with ``math``, never with the code under test;
each test's docstring writes out the arithmetic.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.losses import (
    LOSSES,
    LossParams,
    bradley_terry_probability,
    compute_loss,
    implicit_reward,
    optimal_policy,
    sigmoid_grad_weight,
)

LN2 = math.log(2)


def t(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def neg_log_sigmoid(z: float) -> float:
    """-log sigma(z) = log(1 + e^-z), written so that neither side overflows."""
    return math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z))


def sigma(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def log_odds(mean_logp: float) -> float:
    """log(p / (1 - p)) for p = e^mean_logp."""
    return mean_logp - math.log(-math.expm1(mean_logp))


# Each loss written again with math, from its paper: (pc, pr, rc, rr, lc, lr, params) -> loss.
def _sigmoid(pc, pr, rc, rr, lc, lr, p):
    z = p.beta * ((pc - rc) - (pr - rr))
    eps = p.label_smoothing
    return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)


def _robust(pc, pr, rc, rr, lc, lr, p):
    z = p.beta * ((pc - rc) - (pr - rr))
    eps = p.label_smoothing
    return ((1 - eps) * neg_log_sigmoid(z) - eps * neg_log_sigmoid(-z)) / (1 - 2 * eps)


def _ipo(pc, pr, rc, rr, lc, lr, p):
    h_mean = (pc - rc) / max(lc, 1) - (pr - rr) / max(lr, 1)
    return (h_mean - 1 / (2 * p.beta)) ** 2


def _hinge(pc, pr, rc, rr, lc, lr, p):
    return max(0.0, 1 - p.beta * ((pc - rc) - (pr - rr)))


def _kto_pair(pc, pr, rc, rr, lc, lr, p):
    chosen, rejected = pc - rc, pr - rr
    z0 = max(0.0, (chosen + rejected) / 2)
    return sigma(-p.beta * (chosen - z0)) + sigma(-p.beta * (z0 - rejected))


def _simpo(pc, pr, rc, rr, lc, lr, p):
    return neg_log_sigmoid(p.beta * pc / max(lc, 1) - p.beta * pr / max(lr, 1) - p.simpo_gamma)


def _orpo(pc, pr, rc, rr, lc, lr, p):
    return p.beta * neg_log_sigmoid(log_odds(pc / max(lc, 1)) - log_odds(pr / max(lr, 1)))


def _ref_free(pc, pr, rc, rr, lc, lr, p):
    return neg_log_sigmoid(p.beta * (pc - pr))


BY_HAND = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "ipo": _ipo,
    "hinge": _hinge,
    "kto_pair": _kto_pair,
    "simpo": _simpo,
    "orpo": _orpo,
    "ref_free": _ref_free,
}

# (pc, pr, rc, rr, lc, lr): an ordinary pair, margins of +-50 at log-probs near -1000, a pair
# with empty responses, and one whose policy is far below its reference.
CASES = [
    (-12.5, -15.0, -13.0, -14.0, 5, 4),
    (-950.0, -1000.0, -1000.0, -1000.0, 7, 9),
    (-1000.0, -950.0, -1000.0, -1000.0, 7, 9),
    (-1000.0, -1000.0, -1000.0, -1000.0, 0, 0),
    (-1000.0, -3.0, -1.0, -900.0, 300, 2),
]
# Hyperparameters per loss: beta = 1 turns h = +-50 into margins beta * h = +-50.
PARAMS = {
    "sigmoid": [LossParams("sigmoid", 1.0), LossParams("sigmoid", 0.1, label_smoothing=0.2)],
    "robust": [LossParams("robust", 1.0, label_smoothing=0.1)],
    "ipo": [LossParams("ipo", 0.1)],
    "hinge": [LossParams("hinge", 1.0)],
    "kto_pair": [LossParams("kto_pair", 1.0)],
    "simpo": [LossParams("simpo", 2.0, simpo_gamma=1.0)],
    "orpo": [LossParams("orpo", 0.1)],
    "ref_free": [LossParams("ref_free", 1.0)],
}


def _run(params: LossParams, case, dtype=torch.float64):
    pc, pr, rc, rr, lc, lr = case
    return compute_loss(
        params,
        t(pc, dtype=dtype),
        t(pr, dtype=dtype),
        t(rc, dtype=dtype),
        t(rr, dtype=dtype),
        torch.tensor([lc]),
        torch.tensor([lr]),
    )


def test_every_registered_loss_has_a_hand_formula_and_parameters():
    assert set(BY_HAND) == set(LOSSES) == set(PARAMS)


# Worked examples, one per loss. Common inputs: pc=-12.5, pr=-15, rc=-13, rr=-14, so the
# log-ratios are 0.5 and -1 and h = 1.5; lengths |y_w| = 5, |y_l| = 4.


def test_sigmoid_is_dpo_by_hand():
    """beta = 0.1: beta h = 0.15, L = -ln sigma(0.15) = ln(1 + e^-0.15) = ln 1.860708 = 0.620957.

    Rewards: 0.1 * 0.5 = 0.05 and 0.1 * -1 = -0.1.
    """
    out = _run(LossParams("sigmoid", 0.1), CASES[0])
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-12)
    assert out.losses.item() == pytest.approx(0.6209570477895321, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.05, rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, rel=1e-12)


def test_sigmoid_with_label_smoothing_is_cdpo_by_hand():
    """epsilon = 0.2, beta h = 0.15: L = 0.8 ln(1 + e^-0.15) + 0.2 ln(1 + e^0.15).

    = 0.8 * 0.620957 + 0.2 * 0.770957 = 0.496766 + 0.154191 = 0.650957.
    """
    out = _run(LossParams("sigmoid", 0.1, label_smoothing=0.2), CASES[0])
    expected = 0.8 * math.log1p(math.exp(-0.15)) + 0.2 * math.log1p(math.exp(0.15))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.650957, abs=1e-6)


def test_robust_by_hand_and_equal_to_dpo_without_noise():
    """epsilon = 0.1, beta h = 0.15: L = (0.9 ln(1 + e^-0.15) - 0.1 ln(1 + e^0.15)) / 0.8.

    = (0.558861 - 0.077096) / 0.8 = 0.602207. At epsilon = 0 it is the DPO loss 0.620957.
    """
    out = _run(LossParams("robust", 0.1, label_smoothing=0.1), CASES[0])
    expected = (0.9 * math.log1p(math.exp(-0.15)) - 0.1 * math.log1p(math.exp(0.15))) / 0.8
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.602207, abs=1e-6)
    clean = _run(LossParams("robust", 0.1), CASES[0]).losses.item()
    assert clean == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-12)


def test_ipo_uses_length_normalized_logratios_by_hand():
    """h_mean = 0.5 / 5 - (-1) / 4 = 0.1 + 0.25 = 0.35; target 1 / (2 * 0.1) = 5.

    L = (0.35 - 5)^2 = 4.65^2 = 21.6225. Rewards stay summed: 0.05 and -0.1.
    """
    out = _run(LossParams("ipo", 0.1), CASES[0])
    assert out.losses.item() == pytest.approx(21.6225, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.05, rel=1e-12)


def test_hinge_by_hand_and_zero_past_the_margin():
    """beta h = 0.15: L = max(0, 1 - 0.15) = 0.85. With h = 20, beta h = 2: max(0, -1) = 0."""
    assert _run(LossParams("hinge", 0.1), CASES[0]).losses.item() == pytest.approx(0.85)
    past = _run(LossParams("hinge", 0.1), (-1.0, -21.0, -1.0, -1.0, 1, 1))
    assert past.losses.item() == 0.0


def test_kto_pair_by_hand():
    """Log-ratios 0.5 and -1: z0 = max(0, -0.25) = 0, beta = 0.1.

    L = sigma(-0.1 * (0.5 - 0)) + sigma(-0.1 * (0 - (-1))) = sigma(-0.05) + sigma(-0.1)
      = 0.487503 + 0.475021 = 0.962524.
    With log-ratios 2 and 1: z0 = 1.5, L = sigma(-0.05) + sigma(-0.05) = 0.975006.
    """
    out = _run(LossParams("kto_pair", 0.1), CASES[0])
    assert out.losses.item() == pytest.approx(sigma(-0.05) + sigma(-0.1), rel=1e-12)
    assert out.losses.item() == pytest.approx(0.962524, abs=1e-6)
    shifted = _run(LossParams("kto_pair", 0.1), (-1.0, -2.0, -3.0, -3.0, 1, 1))
    assert shifted.losses.item() == pytest.approx(2 * sigma(-0.05), rel=1e-12)


def test_simpo_by_hand():
    """beta = 2, gamma = 1: mean log-probs -12.5 / 5 = -2.5 and -15 / 4 = -3.75.

    Rewards 2 * -2.5 = -5 and 2 * -3.75 = -7.5; L = -ln sigma(-5 + 7.5 - 1) = ln(1 + e^-1.5)
    = 0.201413.
    """
    out = _run(LossParams("simpo", 2.0, simpo_gamma=1.0), CASES[0])
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-5.0)
    assert out.rejected_rewards.item() == pytest.approx(-7.5)


def test_orpo_by_hand():
    """Mean log-probs -2.5 and -3.75; log odds(m) = m - ln(1 - e^m).

    log odds: -2.5 - ln(1 - 0.082085) = -2.414350; -3.75 - ln(1 - 0.023518) = -3.726201.
    L = 0.1 * ln(1 + e^-(-2.414350 + 3.726201)) = 0.1 * ln(1 + e^-1.311852) = 0.023848.
    Rewards: 0.1 * -2.5 = -0.25 and 0.1 * -3.75 = -0.375.
    """
    out = _run(LossParams("orpo", 0.1), CASES[0])
    lo_c = -2.5 - math.log(1 - math.exp(-2.5))
    lo_r = -3.75 - math.log(1 - math.exp(-3.75))
    assert out.losses.item() == pytest.approx(0.1 * math.log1p(math.exp(lo_r - lo_c)), rel=1e-12)
    assert out.losses.item() == pytest.approx(0.023848, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-0.25)
    assert out.rejected_rewards.item() == pytest.approx(-0.375)


def test_ref_free_by_hand():
    """beta = 0.1: margin 0.1 * (-12.5 + 15) = 0.25; L = ln(1 + e^-0.25) = 0.575939.

    Rewards: 0.1 * -12.5 = -1.25 and 0.1 * -15 = -1.5.
    """
    out = _run(LossParams("ref_free", 0.1), CASES[0])
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.25)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-1.25)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_matches_its_formula_at_ordinary_and_extreme_inputs(name, case):
    """Log-probs of -1000 and margins of +-50 give the math values, finite in float64."""
    for params in PARAMS[name]:
        expected = BY_HAND[name](*case, params)
        out = _run(params, case)
        assert math.isfinite(out.losses.item())
        assert out.losses.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_extremes_give_finite_losses_and_gradients(name):
    """The logsigmoid and clamped forms keep float32 finite where naive forms overflow."""
    for case in CASES:
        pc, pr, rc, rr, lc, lr = case
        policy = t(pc, pr, dtype=torch.float32).requires_grad_()
        out = compute_loss(
            PARAMS[name][0],
            policy[:1],
            policy[1:],
            t(rc, dtype=torch.float32),
            t(rr, dtype=torch.float32),
            torch.tensor([lc]),
            torch.tensor([lr]),
        )
        out.losses.sum().backward()
        assert out.losses.dtype == torch.float32
        assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()
        expected = BY_HAND[name](*case, PARAMS[name][0])
        assert out.losses.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_limits_at_margins_of_plus_and_minus_50():
    """beta h = +50: DPO loss ln(1 + e^-50) = 1.9e-22, not 0 from a NaN; beta h = -50: 50.

    rDPO (epsilon 0.1): +50 -> (0.9 * 1.9e-22 - 0.1 * 50) / 0.8 = -6.25;
    -50 -> (0.9 * 50 - 0.1 * 1.9e-22) / 0.8 = 56.25. Hinge: 0 and 1 + 50 = 51.
    """
    agree, disagree = CASES[1], CASES[2]
    dpo = LossParams("sigmoid", 1.0)
    assert _run(dpo, agree).losses.item() == pytest.approx(math.exp(-50), rel=1e-9)
    assert _run(dpo, disagree).losses.item() == pytest.approx(50.0, rel=1e-12)
    robust = LossParams("robust", 1.0, label_smoothing=0.1)
    assert _run(robust, agree).losses.item() == pytest.approx(-6.25, rel=1e-12)
    assert _run(robust, disagree).losses.item() == pytest.approx(56.25, rel=1e-12)
    assert _run(LossParams("hinge", 1.0), agree).losses.item() == 0.0
    assert _run(LossParams("hinge", 1.0), disagree).losses.item() == pytest.approx(51.0)


def test_orpo_stays_finite_when_a_response_has_probability_one():
    """Mean log-prob 0 would give odds 1 / 0; clamping to -eps keeps the log-odds finite."""
    policy = t(0.0, -5.0).requires_grad_()
    out = compute_loss(LossParams("orpo", 0.1), policy[:1], policy[1:], None, None, t(3), t(3))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo"])
def test_zero_length_responses_give_no_inf_or_nan(name):
    """Empty responses: lengths clamp to 1, so log-probs are divided by 1, never by 0."""
    policy = t(-3.0, -2.0).requires_grad_()
    out = compute_loss(
        PARAMS[name][0],
        policy[:1],
        policy[1:],
        t(-1.0),
        t(-1.0),
        torch.tensor([0]),
        torch.tensor([0]),
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()
    expected = BY_HAND[name](-3.0, -2.0, -1.0, -1.0, 1, 1, PARAMS[name][0])
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


# Value at step 0, when the policy equals the reference (every log-ratio 0).
STEP0 = {
    "sigmoid": lambda p: LN2,  # -ln sigma(0) = ln 2, for any epsilon: mixing ln 2 with ln 2
    "robust": lambda p: LN2,  # ((1 - eps) ln 2 - eps ln 2) / (1 - 2 eps) = ln 2
    "ipo": lambda p: 1 / (4 * p.beta**2),  # (0 - 1 / (2 beta))^2
    "hinge": lambda p: 1.0,  # max(0, 1 - 0)
    "kto_pair": lambda p: 1.0,  # z0 = 0: sigma(0) + sigma(0) = 1
}


def test_step0_table_covers_every_reference_based_loss():
    assert set(STEP0) == {name for name, spec in LOSSES.items() if spec.needs_reference}


@pytest.mark.parametrize("name", sorted(STEP0))
@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_policy_equal_to_reference_gives_the_known_starting_value(name, beta):
    """Whatever the log-probs, a policy equal to its reference starts at the table value."""
    logps = t(-3.0, -250.0, -1000.0)
    lengths = torch.tensor([1, 17, 0])
    for eps in (0.0, 0.3) if name in ("sigmoid", "robust") else (0.0,):
        params = LossParams(name, beta, label_smoothing=eps)
        out = compute_loss(params, logps, logps - 7, logps, logps - 7, lengths, lengths)
        expected = STEP0[name](params)
        assert out.losses.tolist() == pytest.approx([expected] * 3, rel=1e-12)
        assert out.chosen_rewards.tolist() == [0.0, 0.0, 0.0]


def test_sigmoid_gradient_raises_chosen_lowers_rejected_with_weight_beta_sigmoid():
    """dL/d log pi(y_w) = -beta sigma(-beta h), dL/d log pi(y_l) = +beta sigma(-beta h).

    beta = 0.1, h = 1.5: beta sigma(-0.15) = 0.1 * 0.462570 = 0.0462570. Gradient descent
    therefore raises the chosen log-prob and lowers the rejected one.
    """
    beta = 0.1
    policy = t(-12.5, -15.0).requires_grad_()
    out = compute_loss(LossParams("sigmoid", beta), policy[:1], policy[1:], t(-13.0), t(-14.0))
    out.losses.sum().backward()
    weight = beta * sigma(-0.15)
    assert policy.grad.tolist() == pytest.approx([-weight, weight], rel=1e-12)
    assert weight == pytest.approx(0.0462570, abs=1e-7)
    assert sigmoid_grad_weight(beta, t(1.5)).item() == pytest.approx(sigma(-0.15), rel=1e-12)
    stepped = policy.detach() - 1.0 * policy.grad
    assert stepped[0] > policy[0] and stepped[1] < policy[1]


@pytest.mark.parametrize("h", [-50.0, -3.0, 0.0, 1.5, 50.0])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_sigmoid_gradient_magnitude_is_beta_times_grad_weight(h, beta):
    """|dL/d log pi(y_w)| = beta * sigmoid_grad_weight(beta, h) = beta sigma(-beta h)."""
    policy = t(-100.0 + h, -100.0).requires_grad_()
    out = compute_loss(LossParams("sigmoid", beta), policy[:1], policy[1:], t(-100.0), t(-100.0))
    out.losses.sum().backward()
    expected = beta * sigma(-beta * h)
    assert abs(policy.grad[0].item()) == pytest.approx(expected, rel=1e-12)
    assert beta * sigmoid_grad_weight(beta, t(h)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("h", [-50.0, -1.0, 0.5, 1.5, 50.0])
def test_swapping_chosen_and_rejected_changes_sigmoid_loss_by_beta_h(h):
    """-ln sigma(-z) - (-ln sigma(z)) = ln(sigma(z) / sigma(-z)) = ln e^z = z, z = beta h."""
    beta = 0.1
    pc, pr, rc, rr = -20.0 + h, -30.0, -20.0, -30.0
    params = LossParams("sigmoid", beta)
    loss = compute_loss(params, t(pc), t(pr), t(rc), t(rr)).losses.item()
    swapped = compute_loss(params, t(pr), t(pc), t(rr), t(rc)).losses.item()
    assert swapped - loss == pytest.approx(beta * h, rel=1e-12, abs=1e-15)


def test_optimal_policy_recovers_the_reward_up_to_beta_log_z():
    """DPO eq. 4 then eq. 5, on three responses.

    pi_ref = (0.5, 0.3, 0.2), r = (1, -0.5, 2), beta = 0.5:
    Z = 0.5 e^2 + 0.3 e^-1 + 0.2 e^4 = 3.694528 + 0.110364 + 10.919630 = 14.724522.
    pi* = pi_ref e^(r / beta) / Z and beta log(pi* / pi_ref) = r - beta ln Z = r - 1.344757.
    The Bradley-Terry probabilities from those implicit rewards equal sigma(r_i - r_j).
    """
    beta = 0.5
    reference = t(0.5, 0.3, 0.2)
    rewards = t(1.0, -0.5, 2.0)
    z = 0.5 * math.exp(2) + 0.3 * math.exp(-1) + 0.2 * math.exp(4)
    policy = optimal_policy(reference, rewards, beta)
    expected_policy = [0.5 * math.exp(2) / z, 0.3 * math.exp(-1) / z, 0.2 * math.exp(4) / z]
    assert policy.tolist() == pytest.approx(expected_policy, rel=1e-12)
    assert policy.sum().item() == pytest.approx(1.0, rel=1e-12)

    implicit = implicit_reward(beta, policy.log(), reference.log())
    shift = beta * math.log(z)
    assert implicit.tolist() == pytest.approx([1 - shift, -0.5 - shift, 2 - shift], rel=1e-12)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        from_implicit = bradley_terry_probability(implicit[i], implicit[j]).item()
        r = [1.0, -0.5, 2.0]
        assert from_implicit == pytest.approx(sigma(r[i] - r[j]), rel=1e-12)


def test_bradley_terry_probability_by_hand():
    """sigma(1 - 0.5) = 1 / (1 + e^-0.5) = 0.622459; equal rewards give 0.5."""
    assert bradley_terry_probability(t(1.0), t(0.5)).item() == pytest.approx(0.6224593312)
    assert bradley_terry_probability(t(3.0), t(3.0)).item() == 0.5


def test_rpo_alpha_adds_the_chosen_per_token_nll_by_hand():
    """alpha = 0.5, nll = 12.5 / 5 = 2.5: L = 0.620957 + 0.5 * 2.5 = 1.870957."""
    out = _run(LossParams("sigmoid", 0.1, rpo_alpha=0.5), CASES[0])
    dpo = math.log1p(math.exp(-0.15))
    assert out.losses.item() == pytest.approx(dpo + 1.25, rel=1e-12)
    assert out.components["preference"].item() == pytest.approx(dpo, rel=1e-12)
    assert out.components["nll"].item() == pytest.approx(2.5, rel=1e-12)


def test_rewards_and_components_are_detached_and_losses_are_not():
    policy = t(-12.5, -15.0).requires_grad_()
    out = compute_loss(
        LossParams(rpo_alpha=1.0), policy[:1], policy[1:], t(-13.0), t(-14.0), t(5), t(4)
    )
    assert out.losses.requires_grad
    tensors = [out.chosen_rewards, out.rejected_rewards, *out.components.values()]
    assert not any(x.requires_grad for x in tensors)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_batch_gives_the_same_losses_as_its_pairs_one_by_one(name):
    """Every loss is per pair: batching, and so accumulation, cannot change a pair's loss."""
    columns = [t(*values) for values in zip(*CASES, strict=True)]
    batched = compute_loss(PARAMS[name][0], *columns).losses
    alone = [_run(PARAMS[name][0], case).losses.item() for case in CASES]
    assert batched.tolist() == pytest.approx(alone, rel=1e-12, abs=1e-300)


def test_reference_based_loss_without_reference_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match="'sigmoid' needs reference_chosen_logps and reference_rejected_logps.*reference-free",
    ):
        compute_loss(LossParams(), t(-1.0), t(-2.0), None, None)


def test_length_normalized_loss_without_lengths_is_a_clear_error():
    with pytest.raises(ValueError, match="'simpo' needs chosen_lengths and rejected_lengths"):
        compute_loss(LossParams("simpo", 2.0), t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="rpo_alpha=0.5 needs chosen_lengths"):
        compute_loss(LossParams(rpo_alpha=0.5), t(-1.0), t(-2.0), t(-1.0), t(-2.0))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        compute_loss(LossParams(), t(-1.0, -2.0), t(-2.0), t(-1.0), t(-2.0))


def test_integer_lengths_work_like_float_lengths():
    ints = _run(LossParams("simpo", 2.0), CASES[0]).losses
    pc, pr, _, _, lc, lr = CASES[0]
    floats = compute_loss(LossParams("simpo", 2.0), t(pc), t(pr), None, None, t(lc), t(lr))
    assert ints.item() == floats.losses.item()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, r"--beta must be > 0 \(got 0.0\); beta -> 0 removes the KL anchor"),
        ({"beta": -1.0}, r"--beta must be > 0"),
        ({"beta": float("nan")}, r"--beta must be a finite number"),
        ({"label_smoothing": 0.5}, r"--label-smoothing must be in \[0, 0.5\) \(got 0.5\)"),
        ({"label_smoothing": -0.1}, r"--label-smoothing must be in \[0, 0.5\)"),
        ({"loss": "simpo", "simpo_gamma": -1.0}, r"--simpo-gamma must be >= 0 \(got -1.0\)"),
        ({"rpo_alpha": -0.5}, r"--rpo-alpha must be >= 0 \(got -0.5\)"),
        ({"loss": "dpo"}, r"--loss: unknown loss 'dpo'; known losses: hinge, ipo, kto_pair, "),
        ({"simpo_gamma": 1.0}, r"--simpo-gamma 1.0 has no effect with --loss sigmoid; .*simpo"),
        ({"loss": "hinge", "label_smoothing": 0.1}, r"--label-smoothing 0.1 has no effect"),
    ],
)
def test_invalid_params_name_the_flag_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossParams(**kwargs)


def test_non_numeric_params_name_the_flag():
    with pytest.raises(TypeError, match="--beta must be a number"):
        LossParams(beta="0.1")


def test_robust_loss_refuses_a_flip_rate_of_one_half_even_when_called_directly():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        LOSSES["robust"].fn(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=0.1, label_smoothing=0.5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_entries_match_their_functions(name):
    """Keyword parameters are the listed hyperparameters; positional ones the needed inputs."""
    spec = LOSSES[name]
    assert spec.name == name
    signature = inspect.signature(spec.fn).parameters.values()
    keyword = {p.name for p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY}
    positional = [p.name for p in signature if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert keyword == set(spec.hyperparameters)
    assert set(spec.hyperparameters) <= {f for f in LossParams.__dataclass_fields__}
    assert ("reference_chosen_logps" in positional) == spec.needs_reference
    assert ("chosen_lengths" in positional) == spec.needs_lengths


@settings(max_examples=60, deadline=None)
@given(
    logps=st.lists(st.floats(-1000.0, 0.0), min_size=4, max_size=4),
    lengths=st.lists(st.integers(0, 2000), min_size=2, max_size=2),
    beta=st.floats(0.01, 10.0),
    name=st.sampled_from(sorted(LOSSES)),
)
def test_any_log_probs_in_range_give_finite_losses_and_gradients(logps, lengths, beta, name):
    policy = t(*logps[:2]).requires_grad_()
    params = LossParams(name, beta, simpo_gamma=0.5)
    out = compute_loss(
        params,
        policy[:1],
        policy[1:],
        t(logps[2]),
        t(logps[3]),
        torch.tensor(lengths[:1]),
        torch.tensor(lengths[1:]),
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(policy.grad).all()
