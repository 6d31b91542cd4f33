"""Reading every file type and the hub, and reporting each kind of bad input where it occurs."""

from __future__ import annotations

import gzip
import json

import pytest

from preftune.data.formats import BadRecord
from preftune.data.report import DataError, DataReport, ReportEntry
from preftune.data.sources import load_pairs, looks_like_hub_id, read_records

H, A = "\n\nHuman:", "\n\nAssistant:"
SYSTEM = {"role": "system", "content": "Be brief."}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# Each format: records as written, and the (prompt, chosen, rejected) they must become.
FORMATS = {
    "explicit-text": (
        [
            {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
            {"prompt": "Name a colour.\n", "chosen": "Blue,\nlike the sky.", "rejected": "No."},
        ],
        [("What is 2+2?", " 4", " 5"), ("Name a colour.\n", "Blue,\nlike the sky.", "No.")],
    ),
    "implicit-hh": (
        [
            {
                "chosen": f"{H} Hi there{A} Hello! How can I help?",
                "rejected": f"{H} Hi there{A} Go.",
            },
            {"chosen": f"{H} A{A} B{H} C{A} I agree.", "rejected": f"{H} A{A} B{H} C{A} I don't."},
        ],
        [
            (f"{H} Hi there{A}", " Hello! How can I help?", " Go."),
            (f"{H} A{A} B{H} C{A}", " I agree.", " I don't."),
        ],
    ),
    "explicit-chat": (
        [
            {
                "prompt": [SYSTEM, _user("2+2?")],
                "chosen": [_assistant("4")],
                "rejected": [_assistant("5")],
            },
            {
                "prompt": [_user("Hi")],
                "chosen": [_assistant("Hello")],
                "rejected": [_assistant("Go")],
            },
        ],
        [
            ((SYSTEM, _user("2+2?")), (_assistant("4"),), (_assistant("5"),)),
            ((_user("Hi"),), (_assistant("Hello"),), (_assistant("Go"),)),
        ],
    ),
    "implicit-chat": (
        [
            {
                "chosen": [_user("Hi"), _assistant("Hello"), _user("Joke?"), _assistant("Knock.")],
                "rejected": [_user("Hi"), _assistant("Hello"), _user("Joke?"), _assistant("No.")],
            },
            {"chosen": [_user("Q"), _assistant("Yes")], "rejected": [_user("Q"), _assistant("No")]},
        ],
        [
            (
                (_user("Hi"), _assistant("Hello"), _user("Joke?")),
                (_assistant("Knock."),),
                (_assistant("No."),),
            ),
            ((_user("Q"),), (_assistant("Yes"),), (_assistant("No"),)),
        ],
    ),
}


def _load(path, **kwargs):
    report = DataReport()
    return load_pairs(str(path), report=report, **kwargs), report


def _entries(report: DataReport) -> list[tuple[int, str]]:
    return [(entry.record, entry.reason) for entry in report.entries]


# Every format from every file type


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", list(FORMATS))
def test_same_records_give_the_same_pairs_from_every_file_type(write_dataset, name, suffix):
    records, expected = FORMATS[name]
    path = write_dataset(f"{name}{suffix}", records)

    pairs, report = _load(path)

    assert [(pair.prompt, pair.chosen, pair.rejected) for pair in pairs] == expected
    assert all(pair.source == str(path) for pair in pairs)
    assert (report.num_read, report.num_kept, report.entries) == (2, 2, [])


@pytest.mark.parametrize(
    ("suffix", "records"),
    [(".jsonl", [1, 2]), (".json", [1, 2]), (".parquet", [1, 2]), (".csv", [2, 11])],
)
def test_record_numbers_are_lines_for_text_files_and_indices_otherwise(
    write_dataset, suffix, records
):
    """In CSV the header is line 1; the first HH row holds eight newlines, so spans lines 2-10."""
    path = write_dataset(f"hh{suffix}", FORMATS["implicit-hh"][0])

    pairs, _ = _load(path)

    assert [pair.record for pair in pairs] == records


def test_hub_dataset_is_loaded_by_name_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(FORMATS["explicit-text"][0])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    pairs, report = _load("someone/prefs", split="test")

    assert calls == [("someone/prefs", "test")]
    assert [(pair.source, pair.record, pair.chosen) for pair in pairs] == [
        ("someone/prefs", 1, " 4"),
        ("someone/prefs", 2, "Blue,\nlike the sky."),
    ]
    assert report.read_by_source == {"someone/prefs": 2}


def test_hub_dataset_that_cannot_be_loaded_raises_a_data_error(monkeypatch):
    import datasets

    def unreachable(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)

    with pytest.raises(DataError) as caught:
        read_records("someone/prefs", split="train")

    assert str(caught.value) == (
        "someone/prefs: cannot load hub dataset split 'train' (ConnectionError: no network)"
    )


@pytest.mark.parametrize(
    ("spec", "is_hub"),
    [
        ("Anthropic/hh-rlhf", True),
        ("trl-lib/ultrafeedback_binarized", True),
        ("data/train.jsonl", False),
        ("prefs.csv", False),
        ("./owner/name", False),
        ("/abs/owner", False),
        ("a/b/c", False),
    ],
)
def test_hub_ids_are_owner_slash_name_without_a_data_suffix(spec, is_hub):
    assert looks_like_hub_id(spec) is is_hub


# JSON documents


def test_json_object_holding_records_under_data_is_read(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": FORMATS["explicit-text"][0]}))

    pairs, _ = _load(path)

    assert [pair.chosen for pair in pairs] == [" 4", "Blue,\nlike the sky."]


def test_json_object_keyed_by_split_gives_the_requested_split(tmp_path):
    path = tmp_path / "splits.json"
    first, second = FORMATS["explicit-text"][0]
    path.write_text(json.dumps({"train": [first], "test": [second]}))

    pairs, _ = _load(path, split="test")

    assert [(pair.record, pair.prompt) for pair in pairs] == [(1, "Name a colour.\n")]


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    path = tmp_path / "lines.json"
    records = FORMATS["explicit-text"][0]
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")

    pairs, _ = _load(path)

    assert [(pair.record, pair.chosen) for pair in pairs] == [
        (1, " 4"),
        (3, "Blue,\nlike the sky."),
    ]


def test_json_array_element_that_is_not_an_object_is_reported_by_index(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([FORMATS["explicit-text"][0][0], "oops", None]))

    pairs, report = _load(path)

    assert len(pairs) == 1
    assert _entries(report) == [
        (2, "record is text, expected an object"),
        (3, "record is null, expected an object"),
    ]


# Bad records: each one reported with its reason at its line

VALID = b'{"prompt": "Q", "chosen": "a", "rejected": "b"}'


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            b'{"prompt": "Q", "chosen": "a" "rejected": "b"}',
            "malformed JSON (Expecting ',' delimiter: column 31)",
        ),
        (
            b'{"prompt": "Q", "chosen": "a", "rejected": "b"',
            "malformed JSON (Expecting ',' delimiter: column 47)",
        ),
        (
            b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
            "invalid UTF-8 (byte 0xe9 at column 16)",
        ),
        (b"[1, 2]", "record is an array, expected an object"),
        (b"42", "record is a number, expected an object"),
        (b'{"prompt": "Q", "chosen": "a"}', "missing field 'rejected'"),
        (
            b'{"prompt": 7, "chosen": "a", "rejected": "b"}',
            "field 'prompt' is a number, expected text or a list of messages",
        ),
        (
            b'{"prompt": "Q", "chosen": null, "rejected": "b"}',
            "field 'chosen' is null, expected text or a list of messages",
        ),
        (
            b'{"prompt": "Q", "chosen": "a", "rejected": {"text": "b"}}',
            "field 'rejected' is an object, expected text or a list of messages",
        ),
        (b'{"prompt": "", "chosen": "a", "rejected": "b"}', "empty prompt"),
        (b'{"prompt": "Q", "chosen": " ", "rejected": "b"}', "empty chosen response"),
        (b'{"prompt": "Q", "chosen": "a", "rejected": ""}', "empty rejected response"),
        (b'{"prompt": "Q", "chosen": "same", "rejected": "same"}', "identical chosen and rejected"),
        (
            json.dumps({"chosen": f"{H} One{A} a", "rejected": f"{H} Two{A} b"}).encode(),
            "transcripts differ before the final assistant turn",
        ),
        (
            json.dumps({"chosen": "no markers here", "rejected": "none here"}).encode(),
            "no 'prompt' field and no HH turn marker ('\\n\\nAssistant:') in chosen or rejected",
        ),
        (
            b'{"prompt": [{"role": "bot", "content": "hi"}], "chosen": "a", "rejected": "b"}',
            "unknown role 'bot' in 'prompt'",
        ),
    ],
)
def test_bad_record_is_reported_with_its_reason_and_line(tmp_path, line, reason):
    """Line 1 is valid, line 2 blank (not a record), line 3 bad, line 4 valid."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([VALID, b"", line, VALID.replace(b'"b"', b'"c"')]) + b"\n")

    pairs, report = _load(path)
    with pytest.raises(DataError) as caught:
        _load(path, on_bad_record="error")

    assert [pair.record for pair in pairs] == [1, 4]
    assert report.entries == [ReportEntry(str(path), 3, reason, "dropped")]
    assert (report.num_read, report.num_kept) == (3, 2)
    assert str(caught.value) == f"{path}:3: {reason}"


def test_csv_problems_are_reported_at_the_line_their_row_starts_on(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(
        b"prompt,chosen,rejected\n"  # line 1
        b'Q1,"two\nlines",b\n'  # lines 2-3
        b"\n"  # line 4: blank, not a record
        b"Q2,only two\n"  # line 5
        b"Q3,caf\xff,c\n"  # line 6
        b'Q4,"multi\nline \xff",c\n'  # lines 7-8, invalid UTF-8 on line 8
        b"Q5,same,same\n"  # line 9
        b",a,b\n"  # line 10
        b"Q6,x,y\n"  # line 11
    )

    pairs, report = _load(path)

    assert [(pair.record, pair.prompt, pair.chosen) for pair in pairs] == [
        (2, "Q1", "two\nlines"),
        (11, "Q6", "x"),
    ]
    assert _entries(report) == [
        (5, "row has 2 cells, the header has 3"),
        (6, "invalid UTF-8 (byte 0xff at column 7)"),
        (7, "invalid UTF-8 (byte 0xff at column 6)"),
        (9, "identical chosen and rejected"),
        (10, "empty prompt"),
    ]


def test_csv_cell_holding_text_that_merely_starts_with_a_bracket_stays_text(tmp_path):
    path = tmp_path / "brackets.csv"
    path.write_text('prompt,chosen,rejected\n"[INST] hi [/INST]",[1],"[not json"\n')

    pairs, _ = _load(path)

    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        "[INST] hi [/INST]",
        "[1]",
        "[not json",
    )


def test_csv_header_with_a_misspelt_column_names_the_missing_field(tmp_path):
    path = tmp_path / "columns.csv"
    path.write_text("prompt,chosen,rejekted\nQ,a,b\n")

    with pytest.raises(DataError) as caught:
        _load(path, on_bad_record="error")

    assert str(caught.value) == f"{path}:2: missing field 'rejected'"


def test_crlf_transcripts_are_kept_and_reported_as_altered(tmp_path):
    path = tmp_path / "windows.jsonl"
    raw = {"chosen": "\r\n\r\nHuman: Q\r\n\r\nAssistant: Yes", "rejected": "\r\n\r\nHuman: Q"}
    raw["rejected"] += "\r\n\r\nAssistant: No"
    path.write_text(json.dumps(raw) + "\n")

    pairs, report = _load(path)

    assert (pairs[0].prompt, pairs[0].chosen) == (f"{H} Q{A}", " Yes")
    assert report.entries == [
        ReportEntry(str(path), 1, "normalized CRLF line endings to LF", "altered")
    ]
    assert (report.num_read, report.num_kept, report.num_dropped) == (1, 1, 0)


def test_byte_order_mark_before_the_first_record_is_ignored(tmp_path):
    jsonl, csv_file = tmp_path / "bom.jsonl", tmp_path / "bom.csv"
    jsonl.write_bytes(b"\xef\xbb\xbf" + VALID + b"\n")
    csv_file.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nQ,a,b\n")

    for path in (jsonl, csv_file):
        pairs, _ = _load(path)
        assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q", "a", "b")


# Whole-source problems


def test_file_with_no_usable_record_raises_with_the_top_reasons(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        b'{"prompt": "Q", "chosen": "", "rejected": "b"}',
        b'{"prompt": "Q", "chosen": "", "rejected": "c"}',
        b'{"prompt": "Q", "chosen": "a"}',
    ]
    path.write_bytes(b"\n".join(lines))

    report = DataReport()
    with pytest.raises(DataError) as caught:
        load_pairs(str(path), report=report)

    assert str(caught.value) == (
        f"{path}: no usable records: read 3, dropped 3 "
        "(2 empty chosen response, 1 missing field 'rejected')"
    )
    assert (report.num_read, report.num_dropped) == (3, 3)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_file_without_records_raises(tmp_path, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(content)

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value) == f"{path}: no usable records: the source holds no records"


def test_csv_with_only_a_header_has_no_records(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("prompt,chosen,rejected\n")

    with pytest.raises(DataError, match="the source holds no records"):
        _load(path)


def test_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "data" / "missing.jsonl"

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value) == f"{path}: file not found"


def test_missing_relative_data_file_is_not_mistaken_for_a_hub_id():
    with pytest.raises(DataError) as caught:
        read_records("nowhere/train.jsonl")

    assert str(caught.value) == "nowhere/train.jsonl: file not found"


def test_folder_and_unsupported_file_type_are_refused(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")

    with pytest.raises(DataError) as folder:
        read_records(str(tmp_path))
    with pytest.raises(DataError) as unsupported:
        read_records(str(text_file))

    assert str(folder.value) == f"{tmp_path}: is a folder, expected a data file"
    assert str(unsupported.value) == (
        f"{text_file}: unsupported file type "
        "(expected .jsonl, .ndjson, .json, .csv (each optionally .gz) or .parquet)"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is not gzip", "corrupt gzip stream (Not a gzipped file (b'th'))"),
        (
            gzip.compress(VALID * 50)[:-12],
            (
                "corrupt gzip stream (Compressed file ended before the end-of-stream marker "
                "was reached)"
            ),
        ),
    ],
    ids=["not-gzip", "truncated"],
)
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".csv.gz"])
def test_corrupt_gzip_raises_naming_the_file(tmp_path, data, reason, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value) == f"{path}: {reason}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[{"prompt": "Q",\n  "chosen": "a",\n  rejected: "b"}]', "malformed JSON "),
        ("42", "expected an array of records, found a number"),
        (
            '{"a": [], "b": []}',
            "expected an array of records or an object holding one under 'data'; keys: 'a', 'b'",
        ),
    ],
)
def test_unparseable_json_document_raises_naming_the_file(tmp_path, text, reason):
    path = tmp_path / "doc.json"
    path.write_text(text)

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value).startswith(f"{path}: {reason}")


def test_malformed_json_document_error_gives_line_and_column(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[{"prompt": "Q",\n  "chosen": "a",\n  rejected: "b"}]')

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value) == (
        f"{path}: malformed JSON (Expecting property name enclosed in double quotes: "
        "line 3 column 3)"
    )


def test_json_document_with_invalid_utf8_raises_with_its_line(tmp_path):
    path = tmp_path / "doc.json"
    path.write_bytes(b'[\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n]')

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value) == f"{path}: invalid UTF-8 at line 2 (byte 0xe9)"


def test_corrupt_parquet_raises_naming_the_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")

    with pytest.raises(DataError) as caught:
        _load(path)

    assert str(caught.value).startswith(f"{path}: cannot read Parquet (")


# Options


def test_limit_keeps_the_first_usable_pairs_and_stops_reading(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [VALID, b'{"prompt": "Q", "chosen": "", "rejected": "b"}']
    lines += [VALID.replace(b'"Q"', f'"Q{i}"'.encode()) for i in range(5)]
    path.write_bytes(b"\n".join(lines))

    pairs, report = _load(path, limit=3)

    assert [(pair.record, pair.prompt) for pair in pairs] == [(1, "Q"), (3, "Q0"), (4, "Q1")]
    assert (report.num_read, report.num_kept, report.num_dropped) == (4, 3, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_bad_record": "warn"}, "on_bad_record must be one of"),
        ({"limit": 0}, "limit must be a positive integer or None, got 0"),
    ],
)
def test_invalid_options_are_refused_before_reading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_pairs("never/read", report=DataReport(), **kwargs)


def test_read_records_yields_bad_records_as_values(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(VALID + b"\n{oops\n")

    records = list(read_records(str(path)))

    assert records[0] == (1, {"prompt": "Q", "chosen": "a", "rejected": "b"})
    assert records[1][0] == 2
    assert isinstance(records[1][1], BadRecord)
    assert records[1][1].reason == (
        "malformed JSON (Expecting property name enclosed in double quotes: column 2)"
    )
