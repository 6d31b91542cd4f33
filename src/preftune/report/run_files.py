"""Reading a run directory written by ``preftune train`` into plain Python values.

A report must render for any run a user points it at, including runs that stopped early, ran
without held-out pairs, or were written by an older version. So every file but
``metrics.jsonl`` is optional, unreadable lines are skipped and listed in ``problems``, and
metric values are read as floats: JSON has no NaN or infinity, so ``metrics.jsonl`` spells
them as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, and those become float NaN and
infinities here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EVAL_PREFIX = "eval/"


@dataclass
class RunFiles:
    """Everything the report reads from one run directory.

    ``train_rows`` are the metrics rows of training steps; ``eval_rows`` the rows of held-out
    evaluations with the ``eval/`` prefix removed from their keys. ``eval_pairs`` maps each
    evaluation step to its per-pair rows, in the order they were written.
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    data_report: dict[str, Any] | None = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_pairs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def eval_steps(self) -> list[int]:
        """Steps with per-pair evaluation rows, in increasing order."""
        return sorted(self.eval_pairs)


def number(value: Any) -> float:
    """A metric value as a float: NaN for strings that are no number, None, bools and lists."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # also reads "nan", "inf", "-inf"
        except ValueError:
            return math.nan
    return math.nan


def series(rows: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric over the rows that have it (NaN kept as NaN)."""
    steps, values = [], []
    for row in rows:
        if name in row:
            steps.append(int(row["step"]))
            values.append(number(row[name]))
    return steps, values


def read_run(path: str | Path) -> RunFiles:
    """Read a run directory.

    Raises:
        FileNotFoundError: if ``path`` is not a directory or holds no ``metrics.jsonl``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: run directory not found")
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{path}: no metrics.jsonl; expected a run directory written by `preftune train`"
        )
    run = RunFiles(path)
    run.config = _read_mapping(path / "config.yaml", run.problems, yaml.safe_load) or {}
    run.summary = _read_mapping(path / "summary.json", run.problems, json.loads) or {}
    run.data_report = _read_mapping(path / "data_report.json", run.problems, json.loads)

    for row in _read_jsonl(path / "metrics.jsonl", run.problems):
        if "step" not in row:
            continue
        evals = {k[len(EVAL_PREFIX) :]: v for k, v in row.items() if k.startswith(EVAL_PREFIX)}
        if evals:
            run.eval_rows.append({"step": row["step"], **evals})
        rest = {k: v for k, v in row.items() if not k.startswith(EVAL_PREFIX)}
        if len(rest) > 1:
            run.train_rows.append(rest)

    if (path / "eval_pairs.jsonl").is_file():
        for row in _read_jsonl(path / "eval_pairs.jsonl", run.problems):
            if isinstance(row.get("step"), int):
                run.eval_pairs.setdefault(row["step"], []).append(row)
    if (path / "samples.jsonl").is_file():
        run.samples = list(_read_jsonl(path / "samples.jsonl", run.problems))
    return run


def _read_mapping(path: Path, problems: list[str], parse) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        problems.append(f"{path.name}: not readable ({type(err).__name__})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name}: expected a mapping, found {type(value).__name__}")
        return None
    return value


def _read_jsonl(path: Path, problems: list[str]):
    """Yield each line's object; a line that is not a JSON object is skipped and noted."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number_, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                problems.append(f"{path.name}:{number_}: not valid JSON, skipped")
                continue
            if isinstance(row, dict):
                yield row
            else:
                problems.append(f"{path.name}:{number_}: not a JSON object, skipped")
