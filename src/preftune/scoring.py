"""Scoring responses with a policy's implicit reward, ranking them, and summarizing pairs.

The implicit reward of a response y to a prompt x is r(x, y) = beta * log(pi(y|x) / pi_ref(y|x))
(Rafailov et al. 2023, eq. 5, without the beta * log Z(x) term, which is the same for every
response to one prompt and so changes no ranking and no preference probability). Responses
to one prompt are ranked by it, and each pairwise preference gets its Bradley-Terry
probability sigmoid(r_i - r_j) (eq. 1).

Prompts and responses are rendered and tokenized exactly as in training (``PairTokenizer``):
a response is scored as the chosen side of a pair with itself, so a prompt longer than
``max_length`` loses tokens from the left as training would cut it for that response.
Log-probs come from the same batched code as training (``collate_sequences`` and
``sequence_logps``), and pair metrics from ``evaluate``, so every number here means what the
training log means by the same name.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from preftune.data.collate import collate_sequences
from preftune.data.formats import (
    BadRecord,
    Messages,
    PreferencePair,
    _messages,
    check_unicode,
    describe_type,
)
from preftune.data.report import DataError
from preftune.data.sources import read_records
from preftune.data.tokenize import PairTokenizer, TokenizedPair
from preftune.evaluate import EvalResult, evaluate
from preftune.logps import sequence_logps
from preftune.losses import bradley_terry_probability, implicit_reward
from preftune.reference import attach_reference_logps
from preftune.runs import OpenedRun

Content = str | Messages

# z for a two-sided 95% interval: the 0.975 quantile of the standard normal.
Z_95 = 1.959963984540054


# Reading responses to score


@dataclass(frozen=True)
class ScoreRecord:
    """One input line: a prompt and the responses to score against each other."""

    record: int  # 1-based line number in the input file
    prompt: Content
    responses: tuple[Content, ...]
    labels: tuple[str, ...] | None = None  # ("chosen", "rejected") for a preference pair


def read_score_records(path: str) -> list[ScoreRecord]:
    """Read and check every record of a file of responses to score.

    A record is ``{"prompt", "response"}``, ``{"prompt", "responses": [...]}`` or a
    preference pair ``{"prompt", "chosen", "rejected"}`` (scored as two labelled responses).
    Prompts and responses are text, or chat messages as in training data.

    Raises:
        DataError: at the first unusable record, as ``path:line: reason``.
    """
    if not Path(path).is_file():
        raise DataError(path, None, "file not found")
    records = []
    stream = read_records(path)
    try:
        for number, raw in stream:
            if isinstance(raw, BadRecord):
                raise DataError(path, number, raw.reason)
            try:
                records.append(parse_score_record(raw, number))
            except BadRecord as bad:
                raise DataError(path, number, bad.reason) from None
    finally:
        stream.close()
    if not records:
        raise DataError(path, None, "no records to score")
    return records


def parse_score_record(raw: Mapping, number: int) -> ScoreRecord:
    """Check one raw record and normalize its prompt and responses. Raises BadRecord."""
    if not isinstance(raw, Mapping):
        raise BadRecord(f"record is {describe_type(raw)}, expected an object")
    if "prompt" not in raw:
        raise BadRecord("missing field 'prompt'")
    shapes = [name for name in ("response", "responses", "chosen") if name in raw]
    if not shapes:
        raise BadRecord("missing field 'response' (or 'responses', or 'chosen' and 'rejected')")
    if len(shapes) > 1:
        raise BadRecord(f"fields {' and '.join(repr(s) for s in shapes)}: give only one of them")
    labels = None
    if shapes == ["response"]:
        fields = [("response", raw["response"])]
    elif shapes == ["responses"]:
        values = raw["responses"]
        if isinstance(values, (str, Mapping)) or not isinstance(values, Iterable):
            raise BadRecord(f"field 'responses' is {describe_type(values)}, expected an array")
        fields = [(f"responses[{i}]", value) for i, value in enumerate(values)]
        if not fields:
            raise BadRecord("field 'responses' is empty")
    else:
        if "rejected" not in raw:
            raise BadRecord("missing field 'rejected'")
        fields = [("chosen", raw["chosen"]), ("rejected", raw["rejected"])]
        labels = ("chosen", "rejected")
    for name, value in [("prompt", raw["prompt"]), *fields]:
        check_unicode(name, value)
    prompt = parse_prompt(raw["prompt"])
    responses = tuple(_response(name, value, prompt) for name, value in fields)
    return ScoreRecord(number, prompt, responses, labels)


def parse_prompt(value) -> Content:
    """A prompt as text or a tuple of chat messages. Raises BadRecord."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty prompt")
        return value
    messages = _messages("prompt", value)
    if not messages or not any(m["content"].strip() for m in messages):
        raise BadRecord("empty prompt")
    if messages[-1]["role"] == "assistant":
        raise BadRecord("prompt ends with an assistant message")
    return messages


def _response(field: str, value, prompt: Content) -> Content:
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"empty response in '{field}'")
        if isinstance(prompt, str):
            return value
        value = [{"role": "assistant", "content": value}]
    elif isinstance(prompt, str):
        raise BadRecord(f"field '{field}' is {describe_type(value)} but 'prompt' is text")
    messages = _messages(field, value)
    if any(m["role"] not in ("assistant", "tool") for m in messages):
        raise BadRecord(f"field '{field}' holds a non-assistant message")
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRecord(f"field '{field}' does not end with an assistant message")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise BadRecord(f"empty response in '{field}'")
    return messages


@dataclass(frozen=True)
class ScoreItem:
    """One (prompt, response) sequence as token ids."""

    record: int
    index: int  # position of the response within its record
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def tokenize_records(
    records: list[ScoreRecord], pair_tokenizer: PairTokenizer, source: str
) -> list[ScoreItem]:
    """Token ids of every response, rendered and truncated exactly as training would.

    Raises:
        DataError: a response that cannot be used (too long for ``max_length``, a chat
            record for a tokenizer without a chat template, ...).
    """
    items = []
    for rec in records:
        for index, response in enumerate(rec.responses):
            pair = PreferencePair(rec.prompt, response, response, source, rec.record)
            try:
                tokenized, _ = pair_tokenizer(pair)
            except BadRecord as bad:
                raise DataError(source, rec.record, f"response {index}: {bad.reason}") from None
            items.append(ScoreItem(rec.record, index, tokenized.prompt_ids, tokenized.chosen_ids))
    return items


# Log-probs


@dataclass
class SequenceScores:
    policy_logps: torch.Tensor  # (N,) summed response-token log-probs under the policy
    reference_logps: torch.Tensor  # (N,) the same under the reference
    num_tokens: torch.Tensor  # (N,) response tokens

    def rewards(self, beta: float) -> torch.Tensor:
        """Implicit rewards beta * (policy_logps - reference_logps). Shape: (N,)."""
        return implicit_reward(beta, self.policy_logps, self.reference_logps)


def score_sequences(
    policy: nn.Module,
    reference: nn.Module,
    prompt_ids: list[tuple[int, ...]],
    response_ids: list[tuple[int, ...]],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> SequenceScores:
    """Sequence log-probs of N (prompt, response) pairs under both models, in batches."""
    starts = range(0, len(prompt_ids), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="score", unit="batch", leave=False)
    device = next(policy.parameters()).device
    policy_logps, reference_logps, lengths = [], [], []
    with torch.no_grad():
        for start in starts:
            end = start + batch_size
            batch = collate_sequences(prompt_ids[start:end], response_ids[start:end], pad_id)
            batch.to(device)
            policy_logps.append(sequence_logps(policy, batch).cpu())
            reference_logps.append(sequence_logps(reference, batch).cpu())
            lengths.append(batch.lengths().cpu())
    return SequenceScores(torch.cat(policy_logps), torch.cat(reference_logps), torch.cat(lengths))


# Ranking


def rank(rewards: torch.Tensor) -> list[int]:
    """1-based rank of each reward, highest first; tied rewards share the better rank."""
    return [1 + int((rewards > r).sum()) for r in rewards]


def preference_probabilities(rewards: torch.Tensor) -> torch.Tensor:
    """P(response i preferred to response j) = sigmoid(r_i - r_j). Shape: (n,) -> (n, n)."""
    return bradley_terry_probability(rewards[:, None], rewards[None, :])


def score_rows(
    records: list[ScoreRecord], items: list[ScoreItem], scores: SequenceScores, beta: float
) -> list[dict]:
    """One output row per response; records of several responses also get ranks."""
    rewards = scores.rewards(beta)
    rows: list[dict] = []
    position = 0
    for rec in records:
        n = len(rec.responses)
        span = slice(position, position + n)
        ranks = rank(rewards[span]) if n > 1 else None
        probabilities = preference_probabilities(rewards[span]) if n > 1 else None
        for i, response in enumerate(rec.responses):
            k = position + i
            num_tokens = int(scores.num_tokens[k])
            row = {
                "record": rec.record,
                "response_index": i,
                "reward": float(rewards[k]),
                "policy_logps": float(scores.policy_logps[k]),
                "reference_logps": float(scores.reference_logps[k]),
                "num_tokens": num_tokens,
                "mean_policy_logps": float(scores.policy_logps[k]) / num_tokens,
            }
            if rec.labels is not None:
                row["label"] = rec.labels[i]
            if ranks is not None:
                row["rank"] = ranks[i]
                # Element j: probability that this response is preferred to response j.
                row["preference_probabilities"] = [
                    None if j == i else float(probabilities[i, j]) for j in range(n)
                ]
            row["prompt"] = _jsonable(rec.prompt)
            row["response"] = _jsonable(response)
            rows.append(row)
        position += n
    assert position == len(items), "every response was scored once"
    return rows


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSON Lines to a temporary file beside ``path``, then rename it.

    A failure part way leaves no file at ``path`` (or the one that was there before).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(content: Content):
    return content if isinstance(content, str) else [dict(m) for m in content]


# Pair metrics


@dataclass
class PairSummary:
    """Reward accuracy and margins of one model (pair) over a set of preference pairs."""

    accuracy: float  # ties count one half, as in training's rewards/accuracies
    accuracy_ci: tuple[float, float]  # 95% Wilson score interval
    margin_mean: float
    margin_median: float
    loss: float
    num_pairs: int

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "accuracy_ci": list(self.accuracy_ci),
            "margin_mean": self.margin_mean,
            "margin_median": self.margin_median,
            "loss": self.loss,
            "num_pairs": self.num_pairs,
        }


def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion observed as ``accuracy`` over ``n`` trials.

    center = (p + z^2 / 2n) / (1 + z^2 / n),
    half = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)   (Wilson 1927).
    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at p = 0 or
    1. A tie counts as half a success, so ``accuracy * n`` need not be a whole number.
    """
    if n <= 0:
        return (0.0, 1.0)
    denominator = 1 + z * z / n
    center = (accuracy + z * z / (2 * n)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def summarize(result: EvalResult) -> PairSummary:
    """Accuracy with its interval, mean and median margin and loss of an ``evaluate`` result."""
    n = len(result.pairs)
    accuracy = result.metrics["rewards/accuracies"]
    return PairSummary(
        accuracy=accuracy,
        accuracy_ci=wilson_interval(accuracy, n),
        margin_mean=result.metrics["rewards/margins"],
        margin_median=statistics.median(row["margin"] for row in result.pairs),
        loss=result.metrics["loss"],
        num_pairs=n,
    )


@dataclass
class EvalReport:
    policy: PairSummary
    baseline: PairSummary  # the reference in the policy's place
    worst: list[dict]  # the pairs of lowest margin, lowest first


def evaluate_run(
    run: OpenedRun,
    pairs: list[TokenizedPair],
    batch_size: int,
    worst: int = 10,
    progress: bool = False,
) -> EvalReport:
    """Pair metrics of the policy and, as a baseline, of the reference in its place.

    The policy is evaluated exactly as training evaluates it: the loss compares against the
    reference only for reference-based losses, in the run's layout, and with reference
    log-probs computed in one pass first (or read from training's cache) where the run did
    so. For a reference-based loss the baseline is the reference against itself: every
    margin is exactly 0, so its accuracy is 0.5 by construction (each pair is a tie, counted
    one half) and its loss log 2 for DPO.
    """
    if not pairs:
        raise ValueError("no preference pairs to evaluate")
    options = run.step_options
    reference, scored = run.loss_reference, pairs
    if reference is not None and run.precompute_reference:
        (scored,) = attach_reference_logps(
            reference, [pairs], run.pad_id, 2 * batch_size, options, progress=progress
        )
        reference = None
    result = evaluate(
        run.policy, reference, scored, run.params, batch_size, run.pad_id, progress, options
    )
    base = evaluate(
        run.reference,
        run.loss_reference,
        pairs,
        run.params,
        batch_size,
        run.pad_id,
        progress,
        options,
    )
    rows = [{**row, "prompt": pair.prompt_text} for pair, row in zip(pairs, result.pairs)]
    rows.sort(key=lambda row: row["margin"])
    return EvalReport(summarize(result), summarize(base), rows[:worst])
