"""Side-by-side generations of a policy and its reference, with a KL estimate.

For each prompt both models generate (greedy by default, seeded sampling with ``sample``),
and every generation y is scored under both models: its implicit reward is
beta * (log pi(y|x) - log pi_ref(y|x)), whichever model wrote it.

The sequence-level KL divergence KL(pi || pi_ref) = E_{y ~ pi(.|x)}[log pi(y|x) - log pi_ref(y|x)]
is estimated by Monte Carlo: the mean log-ratio over ``kl_samples`` responses sampled from the
policy (temperature 1, no top-k or top-p, so they are draws from pi itself) for each prompt,
averaged over the prompts. Generations stop at ``max_new_tokens``, so this is the KL of the
first ``max_new_tokens`` tokens. A greedy output is the policy's most likely continuation,
not a draw from it, so its log-ratio (``greedy_logratio``) is not a KL estimate: it says how
much more (positive) or less likely the policy finds its own greedy answer than the
reference does.
"""

from __future__ import annotations

import math
import shutil
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from preftune.data.formats import BadRecord, PreferencePair
from preftune.data.report import DataError
from preftune.data.sources import read_records
from preftune.runs import OpenedRun
from preftune.samples import generate
from preftune.scoring import Content, parse_prompt, score_sequences


@dataclass(frozen=True)
class PromptRecord:
    record: int  # 1-based line number in the prompts file
    prompt: Content
    prompt_ids: tuple[int, ...]


@dataclass
class Generation:
    """One generated response, scored under both models."""

    text: str
    num_tokens: int
    policy_logps: float
    reference_logps: float
    reward: float

    @property
    def logratio(self) -> float:
        """log pi(y|x) - log pi_ref(y|x)."""
        return self.policy_logps - self.reference_logps


@dataclass
class Comparison:
    record: int
    prompt: Content
    reference: Generation
    policy: Generation
    kl_logratios: list[float] = field(default_factory=list)  # one per policy sample for the KL


@dataclass
class CompareResult:
    rows: list[Comparison]
    sample: bool  # the shown generations were sampled (else greedy)
    kl_samples: int  # policy samples per prompt behind the KL estimate (0: none drawn)

    def summary(self) -> dict:
        """Mean rewards, and the KL estimate with its standard error when samples were drawn."""
        logratios = [x for row in self.rows for x in row.kl_logratios]
        out = {
            "num_prompts": len(self.rows),
            "decoding": "sample" if self.sample else "greedy",
            "reference_reward_mean": statistics.fmean(r.reference.reward for r in self.rows),
            "policy_reward_mean": statistics.fmean(r.policy.reward for r in self.rows),
            "kl_samples": self.kl_samples,
            "kl_estimate": statistics.fmean(logratios) if logratios else None,
            "kl_stderr": (
                statistics.stdev(logratios) / math.sqrt(len(logratios))
                if len(logratios) > 1
                else None
            ),
        }
        if not self.sample:
            out["greedy_logratio_mean"] = statistics.fmean(r.policy.logratio for r in self.rows)
        return out


def read_prompts(path: str, run: OpenedRun) -> list[PromptRecord]:
    """Prompts of a JSONL file (a ``prompt`` field per line, text or chat messages).

    Each prompt is rendered and tokenized as in training; other fields are ignored, so
    preference-pair and scoring files serve as prompt files too.

    Raises:
        DataError: at the first unusable record, as ``path:line: reason``.
    """
    if not Path(path).is_file():
        raise DataError(path, None, "file not found")
    pair_tokenizer = run.pair_tokenizer()
    prompts = []
    stream = read_records(path)
    try:
        for number, raw in stream:
            try:
                if isinstance(raw, BadRecord):
                    raise raw
                if not isinstance(raw, dict) or "prompt" not in raw:
                    raise BadRecord("missing field 'prompt'")
                prompt = parse_prompt(raw["prompt"])
                # A one-token placeholder response: the prompt renders and truncates exactly
                # as it would before any response in training.
                placeholder = (
                    "." if isinstance(prompt, str) else ({"role": "assistant", "content": "."},)
                )
                tokenized, _ = pair_tokenizer(
                    PreferencePair(prompt, placeholder, placeholder, path, number)
                )
            except BadRecord as bad:
                raise DataError(path, number, bad.reason) from None
            prompts.append(PromptRecord(number, prompt, tokenized.prompt_ids))
    finally:
        stream.close()
    if not prompts:
        raise DataError(path, None, "no prompts")
    return prompts


def sample_seed(seed: int, prompt_index: int, draw: int) -> int:
    """A seed per (prompt, draw), so that any prompt's samples repeat on their own."""
    return hash((seed, prompt_index, draw)) & 0x7FFF_FFFF


def compare(
    run: OpenedRun,
    prompts: list[PromptRecord],
    max_new_tokens: int = 64,
    sample: bool = False,
    seed: int = 0,
    kl_samples: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> CompareResult:
    """Generate from both models for every prompt and score every generation under both.

    Args:
        sample: Sample at temperature 1 (seeded per prompt) instead of greedy decoding.
        kl_samples: Policy samples per prompt for the KL estimate. Default: 1 when
            sampling (the shown policy sample is that draw), 0 for greedy (no estimate).
    """
    if kl_samples is None:
        kl_samples = 1 if sample else 0
    if kl_samples < 0:
        raise ValueError(f"--kl-samples must be >= 0 (got {kl_samples})")
    tokenizer = run.tokenizer
    indices = range(len(prompts))
    if progress and len(prompts) > 1:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="generate", unit="prompt", leave=False)

    # Generate: both models on the same prompt; with sampling both use the same seed.
    shown, kl_draws = [], []
    for i in indices:
        ids = prompts[i].prompt_ids
        first = sample_seed(seed, i, 0)
        ref_ids = generate(run.reference, tokenizer, ids, max_new_tokens, sample, first)
        policy_ids = generate(run.policy, tokenizer, ids, max_new_tokens, sample, first)
        draws = [policy_ids] if sample and kl_samples else []
        for draw in range(len(draws), kl_samples):
            draws.append(
                generate(
                    run.policy, tokenizer, ids, max_new_tokens, True, sample_seed(seed, i, draw)
                )
            )
        shown.append((ref_ids, policy_ids))
        kl_draws.append(draws)

    # Score: every generation under both models, in batches.
    prompt_ids, responses = [], []
    for prompt, (ref_ids, policy_ids), draws in zip(prompts, shown, kl_draws):
        for response in (ref_ids, policy_ids, *draws):
            prompt_ids.append(prompt.prompt_ids)
            responses.append(response)
    scores = score_sequences(
        run.policy, run.reference, prompt_ids, responses, run.pad_id, batch_size, progress
    )
    rewards = scores.rewards(run.params.beta)

    def generation(k: int) -> Generation:
        return Generation(
            tokenizer.decode(responses[k], skip_special_tokens=True),
            len(responses[k]),
            float(scores.policy_logps[k]),
            float(scores.reference_logps[k]),
            float(rewards[k]),
        )

    rows, k = [], 0
    for prompt, draws in zip(prompts, kl_draws):
        logratios = [
            float(scores.policy_logps[j] - scores.reference_logps[j])
            for j in range(k + 2, k + 2 + len(draws))
        ]
        rows.append(
            Comparison(prompt.record, prompt.prompt, generation(k), generation(k + 1), logratios)
        )
        k += 2 + len(draws)
    return CompareResult(rows, sample, kl_samples)


def comparison_row(row: Comparison) -> dict:
    """One JSON line per prompt."""

    def gen(g: Generation) -> dict:
        return {
            "text": g.text,
            "num_tokens": g.num_tokens,
            "reward": g.reward,
            "policy_logps": g.policy_logps,
            "reference_logps": g.reference_logps,
        }

    prompt = row.prompt if isinstance(row.prompt, str) else [dict(m) for m in row.prompt]
    out = {
        "record": row.record,
        "prompt": prompt,
        "reference": gen(row.reference),
        "policy": gen(row.policy),
    }
    if row.kl_logratios:
        out["kl_logratios"] = row.kl_logratios
        out["kl_estimate"] = statistics.fmean(row.kl_logratios)
    return out


def format_table(result: CompareResult, width: int | None = None) -> str:
    """The generations side by side, reference on the left, wrapped to the terminal."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    column = max(20, (width - 3) // 2)
    lines = []
    for row in result.rows:
        lines.append("")
        lines.append(textwrap.shorten(f"[{row.record}] {_prompt_text(row.prompt)}", width))
        left = f"reference  reward {row.reference.reward:+.3f}"
        right = f"policy  reward {row.policy.reward:+.3f}"
        lines.append(f"{left:<{column}} | {right}")
        lines.append(f"{'-' * column}-+-{'-' * column}")
        left_lines = _wrap(row.reference.text, column)
        right_lines = _wrap(row.policy.text, column)
        for i in range(max(len(left_lines), len(right_lines))):
            a = left_lines[i] if i < len(left_lines) else ""
            b = right_lines[i] if i < len(right_lines) else ""
            lines.append(f"{a:<{column}} | {b}".rstrip())
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    """Wrapped lines, runs of blank lines shown as one; whitespace alone is named as such."""
    if not text.strip():
        return [f"(whitespace only, {len(text)} characters)" if text else "(empty)"]
    out: list[str] = []
    for paragraph in text.strip().splitlines():
        wrapped = textwrap.wrap(paragraph, width) or [""]
        if wrapped == [""] and out and out[-1] == "":
            continue
        out.extend(wrapped)
    return out


def _prompt_text(prompt: Content) -> str:
    if isinstance(prompt, str):
        return " ".join(prompt.split())
    return " ".join(prompt[-1]["content"].split())
