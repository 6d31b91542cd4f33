"""Reading preference records from local files and hub datasets.

`read_records` turns a data spec into numbered raw records; `load_pairs` normalizes them into
`PreferencePair`s and records every problem in a `DataReport`.

Local files: ``.jsonl`` (also ``.ndjson``), ``.json`` (an array of objects, or an object holding
the array under the split's name, ``"data"``, or its only list-valued key), ``.csv`` (a header
row; a cell that starts with ``[`` and parses as a JSON list of objects becomes a list of chat
messages) and ``.parquet``. All but Parquet may be gzipped (``.jsonl.gz`` ...). A ``.json`` file
that actually holds JSON Lines is read as JSON Lines. Anything that is not an existing path and
looks like ``owner/name`` is loaded from the hub with ``datasets.load_dataset``.

Record numbers are 1-based line numbers for JSON Lines and CSV (the line a record starts on) and
1-based element indices elsewhere. Problems confined to one record (malformed JSON, invalid
UTF-8, a value that is not an object, a CSV row of the wrong width) are yielded as `BadRecord`
values so that the rest of the file is still read; problems with the whole source raise
`DataError`. Blank lines are not records and are skipped without a report.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from preftune.data.formats import BadRecord, PreferencePair, describe_type, normalize_record
from preftune.data.report import DataError, DataReport

Record = Mapping | BadRecord
# A generator rather than a bare iterator, so that a reader stopped early can close its file.
RecordStream = Generator[tuple[int, Record], None, None]

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
ON_BAD_RECORD = ("skip", "error")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SUPPORTED = ".jsonl, .ndjson, .json, .csv (each optionally .gz) or .parquet"


def load_pairs(
    spec: str,
    *,
    split: str = "train",
    report: DataReport,
    on_bad_record: str = "skip",
    limit: int | None = None,
) -> list[PreferencePair]:
    """Reads a dataset and returns its usable preference pairs in file order.

    Args:
        spec: A local file path or a hub dataset id (``owner/name``).
        split: The split to load from the hub, or to pick from a JSON object keyed by split.
        report: Receives the count of records read and every record dropped or altered.
        on_bad_record: "skip" reports and drops unusable records; "error" raises on the first.
        limit: Keep only the first `limit` usable pairs and stop reading there.

    Raises:
        DataError: On the first unusable record with ``on_bad_record="error"``; when the source
            cannot be read; and always when no usable record is left.
        ValueError: If `on_bad_record` or `limit` is out of range.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")

    pairs: list[PreferencePair] = []
    dropped: Counter[str] = Counter()
    num_read = 0
    records = read_records(spec, split=split)
    try:
        for record, raw in records:
            num_read += 1
            report.mark_read(spec)
            notes: list[str] = []
            problem = raw if isinstance(raw, BadRecord) else None
            if problem is None:
                try:
                    pair = normalize_record(raw, spec, record, notes=notes)
                except BadRecord as bad:
                    problem = bad
            if problem is not None:
                report.add(spec, record, problem.reason)
                dropped[problem.reason] += 1
                if on_bad_record == "error":
                    raise DataError(spec, record, problem.reason) from None
                continue
            for note in notes:
                report.add(spec, record, note, action="altered")
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                break
    finally:
        records.close()

    if not pairs:
        raise DataError(spec, None, _no_pairs_reason(num_read, dropped))
    return pairs


def read_records(spec: str, split: str = "train") -> RecordStream:
    """Yields ``(record_number, record)`` for every record of a file or hub dataset.

    A record is a mapping, or a `BadRecord` when that one record cannot be parsed. The source is
    checked (and a hub dataset loaded) at call time; file contents are read lazily.

    Raises:
        DataError: If the path is missing, a folder or of an unsupported type, or the hub
            dataset cannot be loaded; while iterating, if the file is unreadable, a corrupt
            gzip stream, or a JSON or Parquet document that cannot be parsed.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(spec, None, "is a folder, expected a data file")
    if path.exists():
        kind = file_kind(path.name)
        if kind is None:
            raise DataError(spec, None, f"unsupported file type (expected {_SUPPORTED})")
        reader, compressed = kind
        return _READERS[reader](spec, path, compressed, split)
    if looks_like_hub_id(spec):
        return _hub_records(spec, split)
    raise DataError(spec, None, "file not found")


def file_kind(name: str) -> tuple[str, bool] | None:
    """Returns ``(reader, gzipped)`` for a file name, or None if no reader handles it."""
    name = name.lower()
    if name.endswith(".parquet"):
        return "parquet", False
    compressed = name.endswith(".gz")
    base = name[: -len(".gz")] if compressed else name
    for suffix, reader in FILE_KINDS.items():
        if base.endswith(suffix):
            return reader, compressed
    return None


def looks_like_hub_id(spec: str) -> bool:
    """True for ``owner/name`` specs that do not end in a data-file suffix."""
    return _HUB_ID.fullmatch(spec) is not None and file_kind(spec) is None


def _no_pairs_reason(num_read: int, dropped: Counter[str]) -> str:
    if num_read == 0:
        return "no usable records: the source holds no records"
    top = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common(3))
    return f"no usable records: read {num_read}, dropped {sum(dropped.values())} ({top})"


# Reading bytes


def _open(spec: str, path: Path, compressed: bool) -> Any:
    try:
        return gzip.open(path, "rb") if compressed else open(path, "rb")
    except OSError as error:
        raise DataError(spec, None, f"cannot open ({error.strerror or error})") from error


def _read_failure(spec: str, compressed: bool, error: BaseException) -> DataError:
    what = "corrupt gzip stream" if compressed else "cannot read"
    return DataError(spec, None, f"{what} ({error})")


def _byte_lines(spec: str, path: Path, compressed: bool) -> Iterator[bytes]:
    with _open(spec, path, compressed) as handle:
        try:
            yield from handle
        except (OSError, EOFError, zlib.error) as error:
            raise _read_failure(spec, compressed, error) from error


def _read_bytes(spec: str, path: Path, compressed: bool) -> bytes:
    with _open(spec, path, compressed) as handle:
        try:
            return handle.read()
        except (OSError, EOFError, zlib.error) as error:
            raise _read_failure(spec, compressed, error) from error


def _without_bom(data: bytes) -> bytes:
    return data.removeprefix(codecs.BOM_UTF8)


def _utf8_reason(line: bytes, error: UnicodeDecodeError) -> str:
    column = len(line[: error.start].decode("utf-8")) + 1
    return f"invalid UTF-8 (byte 0x{line[error.start]:02x} at column {column})"


# JSON Lines


def _jsonl_records(spec: str, path: Path, compressed: bool, split: str) -> RecordStream:
    return _numbered_json_lines(_byte_lines(spec, path, compressed))


def _numbered_json_lines(lines: Iterable[bytes]) -> RecordStream:
    for number, line in enumerate(lines, start=1):
        if number == 1:
            line = _without_bom(line)
        if line.strip():
            yield number, _parse_json_object(line.rstrip(b"\r\n"))


def _parse_json_object(line: bytes) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return BadRecord(_utf8_reason(line, error))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return BadRecord(f"malformed JSON ({error.msg}: column {error.colno})")
    except RecursionError:
        return BadRecord("malformed JSON (nesting too deep)")
    except ValueError as error:  # e.g. an integer literal past Python's digit limit
        return BadRecord(f"malformed JSON ({error})")
    if not isinstance(value, dict):
        return BadRecord(f"record is {describe_type(value)}, expected an object")
    return value


# JSON documents


def _json_records(spec: str, path: Path, compressed: bool, split: str) -> RecordStream:
    data = _without_bom(_read_bytes(spec, path, compressed))
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        if _looks_like_json_lines(data):
            yield from _numbered_json_lines(data.split(b"\n"))
            return
        line = data.count(b"\n", 0, error.start) + 1
        reason = f"invalid UTF-8 at line {line} (byte 0x{data[error.start]:02x})"
        raise DataError(spec, None, reason) from None
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one top-level value: JSON Lines
            yield from _numbered_json_lines(data.split(b"\n"))
            return
        reason = f"malformed JSON ({error.msg}: line {error.lineno} column {error.colno})"
        raise DataError(spec, None, reason) from None
    except RecursionError:
        raise DataError(spec, None, "malformed JSON (nesting too deep)") from None
    except ValueError as error:
        raise DataError(spec, None, f"malformed JSON ({error})") from None

    for index, value in enumerate(_record_list(spec, document, split), start=1):
        if isinstance(value, dict):
            yield index, value
        else:
            yield index, BadRecord(f"record is {describe_type(value)}, expected an object")


def _looks_like_json_lines(data: bytes) -> bool:
    first = next((line for line in data.split(b"\n") if line.strip()), b"")
    return isinstance(_parse_json_object(first), dict)


def _record_list(spec: str, document: Any, split: str) -> list:
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        reason = f"expected an array of records, found {describe_type(document)}"
        raise DataError(spec, None, reason)
    if "chosen" in document and "rejected" in document:
        return [document]
    lists = {key: value for key, value in document.items() if isinstance(value, list)}
    for key in (split, "data"):
        if key in lists:
            return lists[key]
    if len(lists) == 1:
        return next(iter(lists.values()))
    keys = ", ".join(repr(key) for key in list(document)[:8]) or "none"
    reason = f"expected an array of records or an object holding one under 'data'; keys: {keys}"
    raise DataError(spec, None, reason)


# CSV


def _csv_records(spec: str, path: Path, compressed: bool, split: str) -> RecordStream:
    bad_lines: dict[int, str] = {}

    def text_lines() -> Iterator[str]:
        # Decoding line by line pins invalid UTF-8 to its line; the replacement text only keeps
        # the CSV parser in step, the row it lands in is reported instead of used.
        for number, line in enumerate(_byte_lines(spec, path, compressed), start=1):
            if number == 1:
                line = _without_bom(line)
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad_lines[number] = _utf8_reason(line, error)
                yield line.decode("utf-8", errors="replace")

    reader = csv.reader(text_lines())
    header: list[str] | None = None
    last_line = 0
    while True:
        try:
            row = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as error:
            row, problem = [], f"malformed CSV ({error})"
        start, last_line = last_line + 1, reader.line_num
        problem = problem or next(
            (bad_lines.pop(n) for n in range(start, last_line + 1) if n in bad_lines), None
        )
        if problem is None and (not row or (len(row) == 1 and not row[0].strip())):
            continue  # a blank line
        if header is None:
            header = _csv_header(spec, start, row, problem)
        elif problem is not None:
            yield start, BadRecord(problem)
        elif len(row) != len(header):
            yield start, BadRecord(f"row has {len(row)} cells, the header has {len(header)}")
        else:
            yield start, {name: _csv_cell(cell) for name, cell in zip(header, row)}


def _csv_header(spec: str, line: int, row: list[str], problem: str | None) -> list[str]:
    if problem is not None:
        raise DataError(spec, line, f"{problem} in the header row")
    header = [name.strip() for name in row]
    duplicates = sorted({name for name in header if name and header.count(name) > 1})
    if duplicates:
        raise DataError(spec, line, f"duplicate column {duplicates[0]!r} in the header row")
    return header


def _csv_cell(cell: str) -> Any:
    """A cell, or the list of messages it holds as JSON (``[{"role": ..., ...}, ...]``)."""
    if not cell.startswith("["):
        return cell
    try:
        value = json.loads(cell)
    except (ValueError, RecursionError):
        return cell
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return value
    return cell


# Parquet


def _parquet_records(spec: str, path: Path, compressed: bool, split: str) -> RecordStream:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                index += 1
                yield index, row
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DataError(spec, None, f"cannot read Parquet ({error})") from error


# Hub datasets


def _hub_records(name: str, split: str) -> RecordStream:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # the hub client raises many types; all mean "not loadable"
        reason = f"cannot load hub dataset split {split!r} ({type(error).__name__}: {error})"
        raise DataError(name, None, reason) from error
    return _numbered_rows(dataset)


def _numbered_rows(rows: Iterable[Any]) -> RecordStream:
    for index, row in enumerate(rows, start=1):
        if isinstance(row, Mapping):
            yield index, row
        else:
            yield index, BadRecord(f"record is {describe_type(row)}, expected an object")


_READERS: dict[str, Callable[[str, Path, bool, str], RecordStream]] = {
    "jsonl": _jsonl_records,
    "json": _json_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
}
