"""What happened to every record on its way from a data file to a preference pair.

A `DataReport` is filled while a dataset is read: each record counts as read, and every record
that is dropped or altered is kept with its source (file path or hub id), its record number and
a short reason. Record numbers are 1-based line numbers for JSON Lines and CSV files, and 1-based
element indices for JSON arrays, Parquet files and hub datasets.

`DataError` is the one exception the data layer raises for problems in the data itself; its
message always says where (source, and record when there is one) and why.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ACTIONS = ("dropped", "altered")


class DataError(ValueError):
    """A data problem, with a message of the form ``source:record: reason``.

    Args:
        source: The file path or hub id the problem was found in.
        record: The record number (see the module docstring), or None when the problem concerns
            the whole source (a missing file, a corrupt archive, an empty dataset).
        reason: What is wrong, in a few words.
    """

    def __init__(self, source: str, record: int | None, reason: str) -> None:
        self.source = source
        self.record = record
        self.reason = reason
        where = source if record is None else f"{source}:{record}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, int | None, str]]:
        # Keeps the exception picklable (worker processes) despite the three-argument init.
        return (type(self), (self.source, self.record, self.reason))


@dataclass(frozen=True)
class ReportEntry:
    """One dropped or altered record."""

    source: str
    record: int
    reason: str
    action: str


class DataReport:
    """Counts of records read and kept, and every record that was dropped or altered."""

    def __init__(self) -> None:
        self.entries: list[ReportEntry] = []
        self.read_by_source: dict[str, int] = {}

    def mark_read(self, source: str, count: int = 1) -> None:
        """Counts `count` records read from `source`, whatever becomes of them."""
        self.read_by_source[source] = self.read_by_source.get(source, 0) + count

    def add(self, source: str, record: int, reason: str, action: str = "dropped") -> None:
        """Records that a record was dropped or altered.

        Raises:
            ValueError: If `action` is neither "dropped" nor "altered".
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        self.entries.append(ReportEntry(source, record, reason, action))

    @property
    def num_read(self) -> int:
        return sum(self.read_by_source.values())

    @property
    def num_dropped(self) -> int:
        return sum(1 for entry in self.entries if entry.action == "dropped")

    @property
    def num_altered(self) -> int:
        """Alterations, not records: one record altered in two ways counts twice."""
        return sum(1 for entry in self.entries if entry.action == "altered")

    @property
    def num_kept(self) -> int:
        return self.num_read - self.num_dropped

    def counts(self, action: str = "dropped") -> dict[str, int]:
        """Number of entries per reason for one action, most frequent first."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        counter = Counter(entry.reason for entry in self.entries if entry.action == action)
        return dict(counter.most_common())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable view: totals, counts per reason and every entry."""
        return {
            "num_read": self.num_read,
            "num_kept": self.num_kept,
            "num_dropped": self.num_dropped,
            "num_altered": self.num_altered,
            "read_by_source": dict(self.read_by_source),
            "dropped_by_reason": self.counts("dropped"),
            "altered_by_reason": self.counts("altered"),
            "entries": [asdict(entry) for entry in self.entries],
        }

    def write(self, path: str | Path) -> Path:
        """Writes `to_dict()` as indented JSON, creating parent folders; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def summary(self) -> str:
        """A few human-readable lines: read, kept, and dropped or altered by reason."""
        lines = [
            f"read {self.num_read} records, kept {self.num_kept}",
            _count_line("dropped", self.num_dropped, self.counts("dropped")),
        ]
        if self.num_altered:
            lines.append(_count_line("altered", self.num_altered, self.counts("altered")))
        return "\n".join(lines)


def _count_line(action: str, total: int, by_reason: dict[str, int]) -> str:
    if not by_reason:
        return f"{action} {total}"
    reasons = ", ".join(f"{count} {reason}" for reason, count in by_reason.items())
    return f"{action} {total}: {reasons}"
