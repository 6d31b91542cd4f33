"""``preftune validate DATA``: the data checks of training, run alone, with every problem listed.

The same pass as ``preftune train`` runs before its first step: every record is read and
normalized, and with ``--model`` also tokenized, so that records too long for
``--max-length`` are found too. Nothing stops at the first bad record; the command prints
the report's summary, then one line per dropped or altered record (``file:line: reason``),
and exits 1 if any record is unusable, 0 otherwise. See docs/bad-input.md for every kind of
problem and its message.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

from preftune.config import TrainConfig
from preftune.data.report import DataError, DataReport
from preftune.rundir import check_output_file


def problem_lines(report: DataReport, limit: int | None = None) -> list[str]:
    """``source:record: reason (action)`` for the report's entries, at most ``limit`` of them."""
    entries = report.entries if limit is None else report.entries[:limit]
    lines = [f"{e.source}:{e.record}: {e.reason} ({e.action})" for e in entries]
    if limit is not None and len(report.entries) > limit:
        lines.append(f"... and {len(report.entries) - limit} more")
    return lines


def validate(
    spec: str,
    *,
    split: str = "train",
    model: str | None = None,
    max_length: int = 512,
    chat_template: str = "auto",
) -> tuple[DataReport, list[int], DataError | None]:
    """Check one dataset; returns the report, token counts of usable pairs, and a fatal error.

    Token counts (prompt plus the longer response, after truncation) are empty without
    ``model``. The error is set when the dataset as a whole cannot be used (a missing or
    corrupt file, no usable record); the report then holds what was found before it.
    """
    from preftune.data.pipeline import resolve_data
    from preftune.data.sources import load_pairs
    from preftune.data.tokenize import PairTokenizer, tokenize_pairs

    report = DataReport()
    try:
        pairs = load_pairs(resolve_data(spec, split), split=split, report=report)
    except DataError as err:
        return report, [], err
    if model is None:
        return report, [], None
    pair_tokenizer = PairTokenizer(load_tokenizer(model), max_length, chat_template)
    tokenized = tokenize_pairs(pairs, pair_tokenizer, report)
    if not tokenized:
        return report, [], DataError(spec, None, "no pair is left after tokenization")
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in tokenized]
    return report, lengths, None


def load_tokenizer(spec: str):
    """The tokenizer of a model spec, without loading the weights; never runs remote code."""
    from transformers import AutoTokenizer

    from preftune import models

    source = models.resolve(spec)
    folder = source.location
    if source.gguf_file is not None:
        folder = str(models.dequantized_copy(source))
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise models.ModelError(f"tokenizer of {spec!r} could not be loaded: {err}") from None


def _run(args: argparse.Namespace) -> int:
    # The training config's own checks (a --max-length below 8 is refused as in training).
    TrainConfig(max_length=args.max_length, chat_template=args.chat_template)
    if args.report:
        check_output_file(args.report, "--report")
    report, lengths, error = validate(
        args.data,
        split=args.split,
        model=args.model,
        max_length=args.max_length,
        chat_template=args.chat_template,
    )
    print(report.summary())
    if lengths:
        print(
            f"tokens per pair (prompt + longer response): min {min(lengths)}, "
            f"median {statistics.median(lengths):g}, max {max(lengths)} "
            f"(--max-length {args.max_length})"
        )
    for line in problem_lines(report):
        print(line)
    if args.report:
        report.write(Path(args.report))
    if error is not None:
        print(f"preftune: error: {error}", file=sys.stderr)
        return 1
    return 1 if report.num_dropped else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` subcommand."""
    defaults = {f.name: f for f in dataclasses.fields(TrainConfig)}
    parser = subparsers.add_parser(
        "validate",
        help="check a dataset and list every bad record",
        description=(
            "Read, check and (with --model) tokenize every record, as training does before its "
            "first step; print a summary and one line per dropped or altered record "
            "(file:line: reason). Exit 1 if any record is unusable, 0 otherwise."
        ),
    )
    parser.add_argument("data", metavar="DATA", help=defaults["data"].metadata["help"])
    parser.add_argument(
        "--split", default="train", help="split to read from a hub dataset (default: train)"
    )
    parser.add_argument(
        "--model",
        metavar="SPEC",
        help="also tokenize with this model's tokenizer and check lengths",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults["max_length"].default,
        metavar="N",
        help=f"{defaults['max_length'].metadata['help']} (default: %(default)s)",
    )
    parser.add_argument(
        "--chat-template",
        default=defaults["chat_template"].default,
        choices=defaults["chat_template"].metadata["choices"],
        help=defaults["chat_template"].metadata["help"],
    )
    parser.add_argument("--report", metavar="FILE", help="also write the report as JSON here")
    parser.set_defaults(func=_run)
