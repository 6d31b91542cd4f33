"""Fixtures for the data tests: writing the same records in every supported file type."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

# The real Anthropic HH-RLHF harmless-base test split; CI clones the repo with ../shared beside it.
HH_TEST_FILE = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh-harmless-test.jsonl.gz"
)


def _csv_text(records: list[dict]) -> str:
    columns = list(dict.fromkeys(key for record in records for key in record))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        cells = [record.get(column, "") for column in columns]
        writer.writerow([cell if isinstance(cell, str) else json.dumps(cell) for cell in cells])
    return buffer.getvalue()


def write_records(path: Path, records: list[dict]) -> Path:
    """Writes `records` to `path` in the file type its suffix names; returns the path."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return path

    base = name.removesuffix(".gz")
    if base.endswith(".jsonl"):
        text = "".join(json.dumps(record) + "\n" for record in records)
    elif base.endswith(".json"):
        text = json.dumps(records, indent=1)
    elif base.endswith(".csv"):
        text = _csv_text(records)
    else:
        raise ValueError(f"no writer for {name}")
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@pytest.fixture()
def write_dataset(tmp_path: Path) -> Callable[[str, list[dict]], Path]:
    """Returns ``write(name, records) -> path`` writing into this test's temporary folder."""

    def write(name: str, records: list[dict]) -> Path:
        return write_records(tmp_path / name, records)

    return write


@pytest.fixture(scope="session")
def hh_test_file() -> Path:
    if not HH_TEST_FILE.is_file():
        pytest.skip(
            f"real HH data not found at {HH_TEST_FILE} (expected ../shared beside the repo)"
        )
    return HH_TEST_FILE
