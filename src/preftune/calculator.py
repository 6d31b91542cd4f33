"""``preftune loss``: the loss of preference pairs from their log-probs, worked step by step.

For each pair (given as flags or read from a CSV or JSONL file) and each beta, it prints the
steps of the DPO loss: both log-ratios, their difference h, beta * h, sigma(beta h), then the
selected loss, the rewards, the gradient weight and the pair's region on the loss curve.
Everything is computed in float64 with the same functions the trainer uses.

Two derived quantities, defined once here and in docs/losses.md:

- gradient weight: -(1 / beta) * d(loss) / d(policy_chosen_logps), the factor multiplying
  beta * grad log pi(y_w) in the update, for the preference term only (without the rpo_alpha
  NLL term). For DPO it is sigmoid(-beta h) (Rafailov et al. 2023, §4); for the
  length-normalized losses it includes the 1 / |y_w| factor.
- region: the sign of the reward margin (chosen reward - rejected reward; beta * h for the
  reference-based losses). Below 0 the model disagrees with the label and the pair sits on
  the steep part of the logistic curve -log sigmoid(z), whose slope tends to -1 there; above
  0 it agrees and the curve flattens, its slope decaying like exp(-z); at exactly 0 the pair
  sits at the bend, where the DPO gradient weight is 1/2. The reading is exact for sigmoid,
  orpo and ref_free; robust never goes flat, simpo bends at a margin of gamma, hinge at
  beta * h = 1, ipo is a parabola and kto_pair saturates on both sides: for those, read the
  gradient weight.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.losses import (
    LOSSES,
    LossParams,
    LossSpec,
    bradley_terry_probability,
    compute_loss,
    flag,
    implicit_reward,
    preference_margin,
)

POLICY_COLUMNS = ("policy_chosen_logps", "policy_rejected_logps")
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")
LENGTH_COLUMNS = ("chosen_length", "rejected_length")
LOGPS_COLUMNS = POLICY_COLUMNS + REFERENCE_COLUMNS

COLUMN_HELP = {
    "policy_chosen_logps": "log pi(y_w): the policy's sequence log-prob of the chosen response",
    "policy_rejected_logps": "log pi(y_l): the policy's sequence log-prob of the rejected one",
    "reference_chosen_logps": "log pi_ref(y_w): the reference model's, of the chosen response",
    "reference_rejected_logps": "log pi_ref(y_l): the reference model's, of the rejected one",
    "chosen_length": "|y_w|: tokens in the chosen response (0 counts as 1)",
    "rejected_length": "|y_l|: tokens in the rejected response (0 counts as 1)",
}
# Text rows: (label, record key); the labels are the ones docs and README use.
ROWS = (
    ("chosen log-ratio", "chosen_logratio"),
    ("rejected log-ratio", "rejected_logratio"),
    ("h", "h"),
    ("beta * h", "beta_h"),
    ("sigma(beta h)", "sigmoid_beta_h"),
    ("loss", "loss"),
    ("chosen reward", "chosen_reward"),
    ("rejected reward", "rejected_reward"),
    ("reward margin", "reward_margin"),
    ("grad weight", "grad_weight"),
    ("region", "region"),
)
NLL_ROWS = (("preference loss", "preference"), ("nll", "nll"))
REGIONS = {
    "steep": "steep (model disagrees)",
    "flat": "flat (model agrees)",
    "bend": "bend (no preference yet)",
}


class InputError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``loss`` subcommand; its ``func`` default is ``run``."""
    parser = subparsers.add_parser(
        "loss",
        help="work out the loss of preference pairs step by step",
        description=__doc__.split("\n\n")[1],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Comma lists of negative numbers ("-12.5,-13") would otherwise be taken for flags; no flag
    # of this subcommand starts with a digit, so anything that does is a value.
    parser._negative_number_matcher = re.compile(r"^-\.?\d")

    source = parser.add_argument_group("pairs (flags take one value or a comma list)")
    source.add_argument("--input", metavar="FILE", help="CSV or JSONL file, one pair per row")
    for column in LOGPS_COLUMNS + LENGTH_COLUMNS:
        source.add_argument(flag(column), dest=column, metavar="X[,X...]", help=COLUMN_HELP[column])

    loss = parser.add_argument_group("loss")
    for f in dataclasses.fields(LossParams):
        text = f"{f.metadata['help']} (default: {f.default})"
        if f.name == "beta":
            text += "; a comma list prints one column per beta"
        loss.add_argument(flag(f.name), dest=f.name, metavar=f.name.upper(), help=text)

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object per (pair, beta)")
    output.add_argument("--digits", default="6", help="decimals in the table (default: 6)")
    parser.set_defaults(func=run)


def _epilog() -> str:
    losses = "\n".join(
        f"  {s.name:<9} {'reference' if s.needs_reference else 'no reference':<12}  {s.summary}"
        for s in LOSSES.values()
    )
    return (
        f"losses:\n{losses}\n\n"
        f"file columns: {', '.join(LOGPS_COLUMNS)}; {', '.join(LENGTH_COLUMNS)} where the loss\n"
        "or --rpo-alpha needs them (response token counts; 0 is treated as 1).\n"
        "grad weight: -(1/beta) d loss / d policy_chosen_logps; sigmoid(-beta h) for DPO.\n"
        "region: steep (model disagrees) when chosen reward < rejected reward, flat (model\n"
        "agrees) when above, bend when equal. docs/losses.md has every formula."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``preftune loss`` with ``argv`` (the arguments after ``loss``)."""
    parser = argparse.ArgumentParser(prog="preftune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loss", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


def run(args: argparse.Namespace) -> int:
    """Print the worked loss of every pair; 0 on success, 2 on bad input."""
    try:
        all_params = _loss_params(args)
        digits = _integer(args.digits, "--digits", 0, 15)
        pairs = _read_pairs(args, LOSSES[all_params[0].loss], all_params[0].rpo_alpha)
        records = work_out(pairs, all_params)
    except InputError as err:
        print(f"preftune loss: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            print(json.dumps(record))
    else:
        print(render(records, all_params, digits))
    return 0


def _loss_params(args: argparse.Namespace) -> list[LossParams]:
    """One ``LossParams`` per value of ``--beta``; unset flags keep the dataclass defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(LossParams):
        text = getattr(args, f.name)
        if text is not None:
            values[f.name] = text.strip() if f.name == "loss" else _numbers(text, flag(f.name))
    betas = values.pop("beta", [LossParams.beta])
    for name, numbers in values.items():
        if name != "loss" and len(numbers) > 1:
            raise InputError(
                f"{flag(name)} takes one value (got {len(numbers)}); only --beta takes a list"
            )
        values[name] = numbers if name == "loss" else numbers[0]
    try:
        return [LossParams(**values, beta=beta) for beta in betas]
    except ValueError as err:
        raise InputError(str(err)) from None


# Input


def _number(text: Any, where: str) -> float:
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise InputError(f"{where}: {text!r} is not a number")
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: {text!r} is not a finite number")
    return value


def _item(name: str, index: int, count: int) -> str:
    return name if count == 1 else f"{name}, item {index}"


def _numbers(text: str, name: str) -> list[float]:
    items = text.split(",")
    return [_number(item.strip(), _item(name, i, len(items))) for i, item in enumerate(items, 1)]


def _integer(text: str, name: str, low: int, high: int) -> int:
    value = _number(text, name)
    if value != int(value) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}] (got {text})")
    return int(value)


def _check_value(column: str, value: float, where: str) -> float:
    if column in LOGPS_COLUMNS and value > 0:
        raise InputError(f"{where}: {value:g} is positive, but a log-prob is at most 0")
    if column in LENGTH_COLUMNS and value < 0:
        raise InputError(f"{where}: {value:g} is negative, but a length counts tokens")
    return value


def _columns(spec: LossSpec, rpo_alpha: float, present: Sequence[str], name) -> list[str]:
    """The columns to read: every one the loss needs, and optional ones that are present.

    Reference log-probs are optional for reference-free losses (they only fill the DPO rows);
    lengths are optional unless the loss or --rpo-alpha needs them. ``name`` spells a column
    in error messages (a flag, or a file column).
    """
    required = list(POLICY_COLUMNS)
    if spec.needs_reference:
        required += REFERENCE_COLUMNS
    if spec.needs_lengths or rpo_alpha > 0:
        required += LENGTH_COLUMNS
    for group in (POLICY_COLUMNS, REFERENCE_COLUMNS, LENGTH_COLUMNS):
        given = [c for c in group if c in present]
        absent = [c for c in group if c not in present]
        if given and absent:
            raise InputError(f"{name(given[0])} is given but {name(absent[0])} is not")
    missing = [c for c in required if c not in present]
    if missing:
        needs_lengths_only = set(missing) <= set(LENGTH_COLUMNS) and not spec.needs_lengths
        reason = "--rpo-alpha > 0" if needs_lengths_only else f"--loss {spec.name}"
        raise InputError(f"missing {' and '.join(map(name, missing))} (needed by {reason})")
    return [c for c in LOGPS_COLUMNS + LENGTH_COLUMNS if c in present]


def _read_pairs(args: argparse.Namespace, spec: LossSpec, rpo_alpha: float) -> dict[str, list]:
    """Column name -> one float per pair, from the flags or from ``--input``."""
    given = [c for c in LOGPS_COLUMNS + LENGTH_COLUMNS if getattr(args, c) is not None]
    if args.input is not None:
        if given:
            raise InputError(f"use either --input or {flag(given[0])}, not both")
        return _read_file(Path(args.input), spec, rpo_alpha)
    if not given:
        raise InputError("give the pairs' log-probs as flags (see --help), or --input FILE")

    pairs = {}
    for column in _columns(spec, rpo_alpha, given, flag):
        values = _numbers(getattr(args, column), flag(column))
        pairs[column] = [
            _check_value(column, v, _item(flag(column), i, len(values)))
            for i, v in enumerate(values, 1)
        ]
    counts = {column: len(values) for column, values in pairs.items()}
    for column, count in counts.items():
        if count != counts[POLICY_COLUMNS[0]]:
            raise InputError(
                f"{flag(column)} has {count} value(s) but {flag(POLICY_COLUMNS[0])} has "
                f"{counts[POLICY_COLUMNS[0]]}"
            )
    return pairs


def _read_file(path: Path, spec: LossSpec, rpo_alpha: float) -> dict[str, list[float]]:
    """Column name -> one float per row of a CSV or JSONL file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"{path}: unknown file type {path.suffix!r}; use .csv or .jsonl")
    rows = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)
    pairs: dict[str, list[float]] = {}
    try:
        for index, (where, row) in enumerate(rows):
            if index == 0:
                try:
                    columns = _columns(spec, rpo_alpha, list(row), lambda c: f"column {c}")
                except InputError as err:
                    raise InputError(f"{path}: {err}") from None
            for column in columns:
                cell = row.get(column)
                if cell is None or (isinstance(cell, str) and not cell.strip()):
                    raise InputError(f"{where}: {column} is missing or empty")
                value = _number(cell, f"{where}, {column}")
                pairs.setdefault(column, []).append(
                    _check_value(column, value, f"{where}, {column}")
                )
    except OSError as err:
        raise InputError(f"{path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if not pairs:
        raise InputError(f"{path}: no pairs found")
    return pairs


def _csv_rows(path: Path):
    """(where, row) for every data row; ``where`` names the file, row and line."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        if reader.fieldnames is not None:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for index, row in enumerate(reader, 1):
            yield f"{path}, row {index} (line {reader.line_num})", row


def _jsonl_rows(path: Path):
    """(where, record) for every non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for line_num, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_num}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


# Computation


def work_out(pairs: dict[str, list[float]], all_params: list[LossParams]) -> list[dict]:
    """One record per (pair, beta), in pair order then beta order, all values in float64."""
    tensors = {c: torch.tensor(v, dtype=torch.float64) for c, v in pairs.items()}
    per_beta = [_one_beta(tensors, params) for params in all_params]

    records = []
    for i in range(len(pairs[POLICY_COLUMNS[0]])):
        for params, (columns, components) in zip(all_params, per_beta, strict=True):
            record = {"pair": i + 1, "beta": params.beta, "loss_type": params.loss}
            record.update({c: pairs[c][i] for c in pairs})
            record.update({k: (None if v is None else v[i]) for k, v in columns.items()})
            margin = record["reward_margin"]
            record["region"] = "steep" if margin < 0 else "flat" if margin > 0 else "bend"
            record["components"] = {k: v[i] for k, v in components.items()}
            records.append(record)
    return records


def _one_beta(tensors: dict[str, torch.Tensor], params: LossParams) -> tuple[dict, dict]:
    """Every per-pair quantity for one beta, and the loss components, as lists of floats.

    The DPO steps are None without reference log-probs.
    """
    policy_chosen = tensors["policy_chosen_logps"].clone().requires_grad_()
    inputs = (
        policy_chosen,
        tensors["policy_rejected_logps"],
        tensors.get("reference_chosen_logps"),
        tensors.get("reference_rejected_logps"),
        tensors.get("chosen_length"),
        tensors.get("rejected_length"),
    )
    out = compute_loss(params, *inputs)
    # The gradient weight is that of the preference term alone, without rpo_alpha * NLL.
    preference = compute_loss(dataclasses.replace(params, rpo_alpha=0.0), *inputs).losses
    (grad,) = torch.autograd.grad(preference.sum(), policy_chosen)

    beta = params.beta
    values: dict[str, torch.Tensor | None] = dict.fromkeys(
        ("chosen_logratio", "rejected_logratio", "h", "beta_h", "sigmoid_beta_h")
    )
    if REFERENCE_COLUMNS[0] in tensors:
        pc, pr, rc, rr = (tensors[c] for c in LOGPS_COLUMNS)
        h = preference_margin(pc, pr, rc, rr)
        chosen_rewards, rejected_rewards = (
            implicit_reward(beta, pc, rc),
            implicit_reward(beta, pr, rr),
        )
        values.update(
            chosen_logratio=pc - rc,
            rejected_logratio=pr - rr,
            h=h,
            beta_h=beta * h,
            sigmoid_beta_h=bradley_terry_probability(chosen_rewards, rejected_rewards),
        )
    values.update(
        loss=out.losses.detach(),
        chosen_reward=out.chosen_rewards,
        rejected_reward=out.rejected_rewards,
        reward_margin=out.chosen_rewards - out.rejected_rewards,
        grad_weight=-grad / beta,
    )
    columns = {k: None if v is None else v.tolist() for k, v in values.items()}
    return columns, {k: v.tolist() for k, v in out.components.items()}


# Output


def format_number(value: float, digits: int) -> str:
    """Fixed-point with ``digits`` decimals, scientific outside [1e-4, 1e7) so nothing reads 0."""
    value += 0.0  # turns -0.0 into 0.0
    if value == 0 or 1e-4 <= abs(value) < 1e7:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}e}"


def render(records: list[dict], all_params: list[LossParams], digits: int) -> str:
    """The text report: a header, then one table per pair with one column per beta."""
    params = all_params[0]
    spec = LOSSES[params.loss]
    lines = [f"loss {spec.name}: {spec.summary}"]
    shown = [n for n in spec.hyperparameters if n != "beta"]
    if params.rpo_alpha > 0:
        shown.append("rpo_alpha")
    if shown:
        lines.append("with " + ", ".join(f"{n}={getattr(params, n):g}" for n in shown))
    rows = ROWS[:6] + NLL_ROWS + ROWS[6:] if params.rpo_alpha > 0 else ROWS

    for start in range(0, len(records), len(all_params)):
        group = records[start : start + len(all_params)]
        first = group[0]
        given = [
            f"{column.replace('_logps', '').replace('_', ' ')} {first[column]:g}"
            for column in LOGPS_COLUMNS + LENGTH_COLUMNS
            if column in first
        ]
        table = [["step"] + [f"beta={r['beta']:g}" for r in group]]
        for label, key in rows:
            table.append([label] + [_cell(r, key, digits) for r in group])
        widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
        lines += ["", f"pair {first['pair']}: " + ", ".join(given)]
        for row in table:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _cell(record: dict, key: str, digits: int) -> str:
    if key == "region":
        return REGIONS[record["region"]]
    value = record["components"].get(key) if key in ("preference", "nll") else record[key]
    return "-" if value is None else format_number(value, digits)


if __name__ == "__main__":
    sys.exit(main())
