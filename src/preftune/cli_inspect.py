"""The ``score``, ``eval`` and ``compare`` subcommands: looking at what a run learned.

Each takes a run directory written by ``preftune train`` (or a model spec with --reference)
and maps its flags to functions of ``runs``, ``scoring`` and ``compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUN_HELP = (
    "a run directory written by `preftune train`, or any model spec (then --reference is required)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score``, ``eval`` and ``compare`` subcommands."""
    score = subparsers.add_parser(
        "score",
        help="implicit rewards of responses, ranked per prompt",
        description="Score responses with a run's implicit reward beta * (policy_logps - "
        "reference_logps) and rank the responses to each prompt. Input: JSON Lines of "
        "{prompt, response}, {prompt, responses: [...]} or {prompt, chosen, rejected}.",
    )
    _add_run_flags(score)
    score.add_argument("--input", required=True, metavar="FILE", help="responses to score")
    score.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="JSON Lines, one row per response (written only on success)",
    )
    score.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="sequences per forward pass (default: 8)",
    )
    score.set_defaults(func=_score)

    evaluate = subparsers.add_parser(
        "eval",
        help="reward accuracy and margins on preference pairs",
        description="Reward accuracy (95%% Wilson interval), margins and loss of the policy "
        "on preference pairs, with the reference alone as a baseline, and the pairs the "
        "policy gets most wrong. Without --data, a run's own held-out pairs.",
    )
    _add_run_flags(evaluate)
    evaluate.add_argument(
        "--data", metavar="FILE", help="preference pairs (default: the run's held-out split)"
    )
    evaluate.add_argument("--limit", type=int, metavar="N", help="evaluate the first N pairs")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="pairs per forward pass (default: the run's, else 4)",
    )
    evaluate.add_argument(
        "--worst",
        type=int,
        default=10,
        metavar="N",
        help="pairs of lowest margin to list (default: 10)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=_eval)

    comp = subparsers.add_parser(
        "compare",
        help="reference and policy generations side by side",
        description="Generate from the reference and the policy for the same prompts, score "
        "each generation's implicit reward, and estimate KL(policy || reference) from "
        "policy samples.",
    )
    _add_run_flags(comp)
    comp.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="JSON Lines with a 'prompt' field (text or chat messages)",
    )
    comp.add_argument("--output", metavar="FILE", help="JSON Lines, one row per prompt")
    comp.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="tokens generated per response (default: 64)",
    )
    comp.add_argument(
        "--sample", action="store_true", help="sample at temperature 1 instead of greedy decoding"
    )
    comp.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    comp.add_argument(
        "--kl-samples",
        type=int,
        metavar="K",
        help="policy samples per prompt for the KL estimate (default: 1 with "
        "--sample, the shown sample; 0 with greedy decoding)",
    )
    comp.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="sequences per scoring pass (default: 8)",
    )
    comp.set_defaults(func=_compare)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_MODEL", help=RUN_HELP)
    parser.add_argument(
        "--reference",
        metavar="SPEC",
        help="reference model (default: the run's config.yaml 'model')",
    )
    parser.add_argument(
        "--beta", type=float, metavar="B", help="implicit-reward scale (default: the run's beta)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 (got {value})")


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _score(args: argparse.Namespace) -> int:
    from preftune.rundir import check_output_file
    from preftune.runs import open_run
    from preftune.scoring import (
        read_score_records,
        score_rows,
        score_sequences,
        tokenize_records,
        write_jsonl_atomic,
    )

    _positive("--batch-size", args.batch_size)
    check_output_file(args.output, "--output")
    records = read_score_records(args.input)  # checked before any model loads
    run = open_run(args.run, args.reference, args.beta)
    items = tokenize_records(records, run.pair_tokenizer(), args.input)
    scores = score_sequences(
        run.policy,
        run.reference,
        [i.prompt_ids for i in items],
        [i.response_ids for i in items],
        run.pad_id,
        args.batch_size,
        _progress(args),
    )
    rows = score_rows(records, items, scores, run.params.beta)
    write_jsonl_atomic(args.output, rows)
    print(
        f"scored {len(rows)} responses to {len(records)} prompts (beta {run.params.beta}); "
        f"written to {args.output}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from preftune.data.report import DataReport
    from preftune.runs import eval_pairs, open_run
    from preftune.scoring import evaluate_run

    for name in ("limit", "batch_size", "worst"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    run = open_run(args.run, args.reference, args.beta)
    report = DataReport()
    pairs = eval_pairs(run, args.data, report, args.limit)
    batch_size = args.batch_size or (run.config.batch_size if run.config else 4)
    result = evaluate_run(run, pairs, batch_size, args.worst, _progress(args))
    if args.json:
        out = {
            **result.policy.to_dict(),
            "accuracy_ci_method": "wilson, 95%",
            "baseline": result.baseline.to_dict(),
            "loss_name": run.params.loss,
            "beta": run.params.beta,
            "worst_pairs": result.worst,
        }
        print(json.dumps(out, indent=2))
        return 0
    if report.num_dropped:
        print(f"data: {report.summary()}", file=sys.stderr)
    print(_eval_text(run, args.data, result))
    return 0


def _eval_text(run, data: str | None, result) -> str:
    source = data or "the run's held-out pairs"
    p, b = result.policy, result.baseline
    lines = [
        f"{p.num_pairs} pairs from {source}; loss {run.params.loss}, beta {run.params.beta}",
        "",
        (
            f"{'':<10} {'accuracy':>9} {'95% CI (Wilson)':>17} {'margin mean':>12} "
            f"{'median':>9} {'loss':>8}"
        ),
    ]
    for name, s in (("policy", p), ("reference", b)):
        ci = f"[{s.accuracy_ci[0]:.3f}, {s.accuracy_ci[1]:.3f}]"
        lines.append(
            f"{name:<10} {s.accuracy:>9.4f} {ci:>17} {s.margin_mean:>12.4f} "
            f"{s.margin_median:>9.4f} {s.loss:>8.4f}"
        )
    if run.needs_reference:
        lines.append(
            "(the reference against itself has every margin exactly 0; a tie counts one half,\n"
            " so its accuracy is 0.5 by construction)"
        )
    if result.worst:
        lines += [
            "",
            "pairs the policy gets most wrong (lowest margin first):",
            f"{'margin':>9} {'chosen':>9} {'rejected':>9}  where / prompt",
        ]
        for row in result.worst:
            lines.append(
                f"{row['margin']:>+9.4f} {row['chosen_reward']:>+9.4f} "
                f"{row['rejected_reward']:>+9.4f}  {Path(row['source']).name}:{row['record']}  "
                f"{_prompt_tail(run.tokenizer, row['prompt'])}"
            )
    return "\n".join(lines)


ROLE_LINES = frozenset({"system", "user", "assistant", "human"})


def _prompt_tail(tokenizer, prompt_text: str, width: int = 60) -> str:
    """The last line of a rendered prompt that is not chat markup: usually the question."""
    for token in tokenizer.all_special_tokens:
        prompt_text = prompt_text.replace(token, "\n")
    lines = [line.strip() for line in prompt_text.splitlines()]
    lines = [line for line in lines if line and line.lower().rstrip(":") not in ROLE_LINES]
    text = lines[-1] if lines else ""
    return text if len(text) <= width else text[: width - 3] + "..."


def _compare(args: argparse.Namespace) -> int:
    from preftune.compare import compare, comparison_row, format_table, read_prompts
    from preftune.rundir import check_output_file
    from preftune.runs import open_run
    from preftune.scoring import write_jsonl_atomic

    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--batch-size", args.batch_size)
    if args.output:
        check_output_file(args.output, "--output")
    if args.kl_samples is not None and args.kl_samples < 0:
        raise ValueError(f"--kl-samples must be >= 0 (got {args.kl_samples})")
    run = open_run(args.run, args.reference, args.beta)
    prompts = read_prompts(args.prompts, run)
    result = compare(
        run,
        prompts,
        args.max_new_tokens,
        args.sample,
        args.seed,
        args.kl_samples,
        args.batch_size,
        _progress(args),
    )
    if args.output:
        write_jsonl_atomic(args.output, [comparison_row(r) for r in result.rows])
    print(format_table(result))
    print()
    s = result.summary()
    print(
        f"{s['num_prompts']} prompts, {s['decoding']} decoding, beta {run.params.beta}: "
        f"mean reward reference {s['reference_reward_mean']:+.4f}, "
        f"policy {s['policy_reward_mean']:+.4f}"
    )
    if s["kl_estimate"] is not None:
        stderr = f" +- {s['kl_stderr']:.4f}" if s["kl_stderr"] is not None else ""
        print(
            f"KL(policy || reference) ~ {s['kl_estimate']:.4f}{stderr} nats per response: "
            f"mean log-ratio of {s['kl_samples']} policy sample(s) per prompt"
        )
    if "greedy_logratio_mean" in s:
        print(
            f"mean log-ratio of the greedy policy outputs {s['greedy_logratio_mean']:+.4f} "
            "(a mode, not a sample: no KL estimate; pass --sample or --kl-samples K)"
        )
    if args.output:
        print(f"written to {args.output}")
    return 0
