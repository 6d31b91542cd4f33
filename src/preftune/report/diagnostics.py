"""The numbers behind the report's warnings and counts, kept apart from any drawing.

- ``logps_trend``: how the chosen and rejected sequence log-probs and the reward margin moved
  from the start to the end of a run, and whether that is the collapse DPO users ask about:
  both log-probs fall while the margin grows, so the pair is separated by making both
  responses less likely and probability mass moves to text that is in neither.
- ``loss_curve``: the run's preference loss as a function of the reward margin, where the loss
  depends on the margin alone, and DPO's -log sigmoid(x) as a stand-in otherwise.
- ``region_counts``: held-out pairs per region of that curve, by the sign of the reward margin
  (the same reading as ``preftune loss``: steep below 0, bend at 0, flat above 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from preftune.losses import LOSSES, LossParams
from preftune.metrics import TIE_TOLERANCE
from preftune.report.run_files import RunFiles, number, series

# A response's log-prob "fell" when it dropped by more than FALL_NATS_PER_TOKEN nats per
# token of the response (e^-0.05 = 0.95: each token about 5% less likely on average). A
# sequence log-prob is a sum over tokens, so the same per-token drift moves a long response
# by many nats and a short one by few; read per token, one rule fits both. Runs whose
# metrics have no response lengths (lengths/chosen, lengths/rejected) fall back to
# FALL_NATS for the whole response: e^-0.1 = 0.905, about 10% less likely.
FALL_NATS_PER_TOKEN = 0.05
FALL_NATS = 0.1

# Losses whose preference term is a function of the reward margin alone, so each held-out
# pair sits exactly on the drawn curve. (ipo works on per-token log-ratios, kto_pair on each
# reward separately and orpo on log-odds: none of them is a curve in the margin.)
CURVE_IN_MARGIN = frozenset({"sigmoid", "robust", "hinge", "simpo", "ref_free"})

REGIONS = ("steep", "bend", "flat")


def loss_name(config: dict[str, Any]) -> str:
    return str(config.get("loss", "sigmoid"))


def needs_reference(config: dict[str, Any]) -> bool:
    """True for reference-based losses (and for unknown names, the common case)."""
    spec = LOSSES.get(loss_name(config))
    return True if spec is None else spec.needs_reference


def reward_label(config: dict[str, Any]) -> str:
    """The y-axis label of rewards: what the run's implicit reward is made of."""
    spec = LOSSES.get(loss_name(config))
    if spec is None or spec.needs_reference:
        return "reward (beta * log-ratio)"
    if spec.needs_lengths:
        return "reward (beta * mean log-prob per token)"
    return "reward (beta * log-prob)"


def margin_label(config: dict[str, Any]) -> str:
    """The x-axis label of the reward margin, which is beta * h where h is defined."""
    spec = LOSSES.get(loss_name(config))
    if spec is None or spec.needs_reference:
        return "reward margin x = beta * h (h: log-ratio difference)"
    if spec.needs_lengths:
        return "reward margin x (beta * difference of mean log-probs per token)"
    return "reward margin x = beta * h (h = log pi(chosen) - log pi(rejected))"


# Log-probs over the run


@dataclass(frozen=True)
class LogpsTrend:
    """Start and end values of the sequence log-probs (nats) and the reward margin.

    ``source`` says what was averaged: the held-out pairs (the same pairs at both ends) when
    the run evaluated at least twice, otherwise the first and last tenth of training steps
    (different batches, so noisier).
    """

    source: str
    start_step: int
    end_step: int
    chosen: tuple[float, float]
    rejected: tuple[float, float]
    margin: tuple[float, float]
    # Mean response lengths in tokens at the start and the end, when the run logged them.
    chosen_tokens: tuple[float, float] | None = None
    rejected_tokens: tuple[float, float] | None = None

    @property
    def chosen_change(self) -> float:
        return self.chosen[1] - self.chosen[0]

    @property
    def rejected_change(self) -> float:
        return self.rejected[1] - self.rejected[0]

    @property
    def margin_change(self) -> float:
        return self.margin[1] - self.margin[0]

    @property
    def per_token(self) -> bool:
        """Whether falls are judged per token (the run logged response lengths)."""
        return self.chosen_tokens is not None and self.rejected_tokens is not None

    @property
    def chosen_change_per_token(self) -> float | None:
        return _per_token_change(self.chosen, self.chosen_tokens)

    @property
    def rejected_change_per_token(self) -> float | None:
        return _per_token_change(self.rejected, self.rejected_tokens)

    def _ruled_change(self, which: str) -> tuple[float, float]:
        """The ``which`` ("chosen" or "rejected") change the rule reads, and its threshold:
        per token when the run logged lengths, else per response."""
        if self.per_token:
            return getattr(self, f"{which}_change_per_token"), FALL_NATS_PER_TOKEN
        return getattr(self, f"{which}_change"), FALL_NATS

    def moved(self, which: str) -> bool:
        """Whether that log-prob rose or fell by more than the rule's threshold."""
        change, threshold = self._ruled_change(which)
        return abs(change) > threshold

    def fell(self, which: str) -> bool:
        """Whether that log-prob fell by more than the rule's threshold."""
        change, threshold = self._ruled_change(which)
        return change < -threshold

    @property
    def fall_rule(self) -> str:
        """The threshold in words, for captions and the report's verdict."""
        if self.per_token:
            return f"{FALL_NATS_PER_TOKEN:g} nats per response token"
        return f"{FALL_NATS:g} nats per response"

    @property
    def collapse(self) -> bool:
        """Both log-probs fell (see FALL_NATS_PER_TOKEN) while the reward margin grew."""
        return self.fell("chosen") and self.fell("rejected") and self.margin_change > 0


def _per_token_change(
    logps: tuple[float, float], tokens: tuple[float, float] | None
) -> float | None:
    """Change of the mean log-prob per token: end / end length - start / start length."""
    if tokens is None:
        return None
    return logps[1] / tokens[1] - logps[0] / tokens[0]


def logps_trend(run: RunFiles) -> LogpsTrend | None:
    """The trend on held-out pairs if evaluated twice or more, else on training steps."""
    names = ("logps/chosen", "logps/rejected", "rewards/margins")
    rows = [r for r in run.eval_rows if all(math.isfinite(number(r.get(n))) for n in names)]
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        return LogpsTrend(
            "held-out pairs",
            int(first["step"]),
            int(last["step"]),
            *((number(first[n]), number(last[n])) for n in names),
            *(_lengths([first], [last], f"lengths/{side}") for side in SIDES),
        )
    rows = [r for r in run.train_rows if all(math.isfinite(number(r.get(n))) for n in names)]
    if len(rows) < 2:
        return None
    window = max(1, len(rows) // 10)
    head, tail = rows[:window], rows[-window:]
    return LogpsTrend(
        "training batches" if window == 1 else f"training batches (mean of {window} steps)",
        int(head[0]["step"]),
        int(tail[-1]["step"]),
        *((_mean(head, n), _mean(tail, n)) for n in names),
        *(_lengths(head, tail, f"lengths/{side}") for side in SIDES),
    )


SIDES = ("chosen", "rejected")


def _lengths(
    head: list[dict[str, Any]], tail: list[dict[str, Any]], name: str
) -> tuple[float, float] | None:
    """Mean response length at each end, or None where a row lacks a positive value."""
    values = [number(r.get(name)) for r in head + tail]
    if not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return _mean(head, name), _mean(tail, name)


def _mean(rows: list[dict[str, Any]], name: str) -> float:
    return float(np.mean([number(r[name]) for r in rows]))


# The loss curve and the pairs on it


@dataclass(frozen=True)
class LossCurve:
    """The curve pairs are drawn on: ``fn`` maps reward margins x to loss values (nats).

    ``exact`` is False when the run's loss is not a function of the margin alone and the
    curve is DPO's -log sigmoid(x), drawn for orientation.
    """

    fn: Callable[[np.ndarray], np.ndarray]
    label: str
    exact: bool
    note: str
    unit: str = "nats"


def loss_curve(config: dict[str, Any]) -> LossCurve:
    """The run's preference loss over the reward margin, or DPO's where that is not defined.

    The curve is computed with the run's own loss function from the registry: policy chosen
    log-prob x / beta, everything else 0 and lengths 1, so that the reward margin is x.
    """
    name = loss_name(config)
    params = _loss_params(config)
    if params is None or name not in CURVE_IN_MARGIN:
        why = (
            f"the run's loss ({name}) is not a function of the reward margin alone"
            if params is not None
            else f"the run's loss settings ({name}) could not be read"
        )
        return LossCurve(
            _curve_of(LossParams()),
            "-log sigmoid(x)  (DPO)",
            False,
            f"Curve: DPO's -log sigmoid(x), drawn for orientation only: {why}, so pairs are "
            "placed on it by their reward margin.",
        )
    note = f"Curve: this run's loss ({name}) as a function of the reward margin x."
    if params.rpo_alpha > 0:
        note += f" The NLL term (rpo_alpha = {params.rpo_alpha:g}) is not part of the curve."
    labels = {
        "sigmoid": "-log sigmoid(x)",
        "ref_free": "-log sigmoid(x)",
        "robust": f"rDPO, epsilon = {params.label_smoothing:g}",
        "hinge": "max(0, 1 - x)",
        "simpo": f"-log sigmoid(x - gamma), gamma = {params.simpo_gamma:g}",
    }
    label = labels[name]
    if name == "sigmoid" and params.label_smoothing > 0:
        label = f"cDPO, epsilon = {params.label_smoothing:g}"
    unit = "reward units" if name == "hinge" else "nats"  # max(0, 1 - x) is no log-prob
    return LossCurve(_curve_of(params), f"{label}  ({name})", True, note, unit)


def _loss_params(config: dict[str, Any]) -> LossParams | None:
    defaults = LossParams()
    try:
        return LossParams(
            **{
                name: config.get(name, getattr(defaults, name))
                for name in ("loss", "beta", "label_smoothing", "simpo_gamma", "rpo_alpha")
            }
        )
    except (TypeError, ValueError):
        return None


def _curve_of(params: LossParams) -> Callable[[np.ndarray], np.ndarray]:
    spec = LOSSES[params.loss]
    hyperparameters = {name: getattr(params, name) for name in spec.hyperparameters}

    def fn(x: np.ndarray) -> np.ndarray:
        margin = torch.as_tensor(np.asarray(x, dtype=np.float64))
        zeros, ones = torch.zeros_like(margin), torch.ones_like(margin)
        inputs = {"policy_chosen_logps": margin / params.beta, "policy_rejected_logps": zeros}
        if spec.needs_reference:
            inputs.update(reference_chosen_logps=zeros, reference_rejected_logps=zeros)
        if spec.needs_lengths:
            inputs.update(chosen_lengths=ones, rejected_lengths=ones)
        losses, _, _ = spec.fn(**inputs, **hyperparameters)
        return losses.numpy()

    return fn


def region_counts(margins: Sequence[float]) -> dict[str, int]:
    """Pairs below 0 (steep), at 0 (bend) and above 0 (flat); NaN or infinite margins, which
    cannot be placed on the curve, count in no region. A margin within TIE_TOLERANCE of 0 is
    at the bend, as it is a tie for reward accuracy: at step 0 every margin is 0 up to the
    float noise of recomputing the same log-probs."""
    values = [m for m in margins if math.isfinite(m)]
    return {
        "steep": sum(m < -TIE_TOLERANCE for m in values),
        "bend": sum(abs(m) <= TIE_TOLERANCE for m in values),
        "flat": sum(m > TIE_TOLERANCE for m in values),
    }


def eval_margins(run: RunFiles, step: int) -> list[float]:
    """Each held-out pair's reward margin at one evaluation step (NaN where unreadable)."""
    return [number(row.get("margin")) for row in run.eval_pairs.get(step, [])]


def median_of(run: RunFiles, name: str) -> float:
    """Median of a training metric over its finite values; NaN when there are none."""
    _, values = series(run.train_rows, name)
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan
