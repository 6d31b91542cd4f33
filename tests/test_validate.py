"""``preftune validate`` and the bad-input table of docs/bad-input.md, row by row.

The tables below hold each kind of bad input with the exact line the command prints for it;
``test_bad_input_doc_matches_these_tables`` keeps docs/bad-input.md equal to them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from preftune.cli import main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-input.md"
H, A = "\n\nHuman:", "\n\nAssistant:"
GOOD = b'{"prompt": "Q", "chosen": "a", "rejected": "b"}'

# Records that are dropped, one per line of data.jsonl after a good line 1.
BAD_RECORDS = [
    (
        "Malformed JSON",
        b'{"prompt": "Q", "chosen": "a" "rejected": "b"}',
        "malformed JSON (Expecting ',' delimiter: column 31)",
    ),
    (
        "Unreadable encoding",
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
        "invalid UTF-8 (byte 0xe9 at column 16)",
    ),
    ("Record is not an object", b"[1, 2]", "record is an array, expected an object"),
    ("Missing field", b'{"prompt": "Q", "chosen": "a"}', "missing field 'rejected'"),
    (
        "Wrongly typed field",
        b'{"prompt": 7, "chosen": "a", "rejected": "b"}',
        "field 'prompt' is a number, expected text or a list of messages",
    ),
    ("Empty prompt", b'{"prompt": " ", "chosen": "a", "rejected": "b"}', "empty prompt"),
    ("Empty response", b'{"prompt": "Q", "chosen": "", "rejected": "b"}', "empty chosen response"),
    (
        "Chosen identical to rejected",
        b'{"prompt": "Q", "chosen": "same", "rejected": "same"}',
        "identical chosen and rejected",
    ),
    (
        "Transcripts whose prompts differ",
        json.dumps({"chosen": f"{H} One{A} a", "rejected": f"{H} Two{A} b"}).encode(),
        "transcripts differ before the final assistant turn",
    ),
    (
        "No prompt and no turn markers",
        b'{"chosen": "yes", "rejected": "no"}',
        "no 'prompt' field and no HH turn marker ('\\n\\nAssistant:') in chosen or rejected",
    ),
    (
        "Malformed chat message",
        b'{"prompt": [{"role": "bot", "content": "hi"}], "chosen": "a", "rejected": "b"}',
        "unknown role 'bot' in 'prompt'",
    ),
    (
        "Lone surrogate in text",
        b'{"prompt": "Q", "chosen": "a\\ud800", "rejected": "b"}',
        "field 'chosen' has a lone surrogate '\\ud800' at character 1: not valid Unicode text",
    ),
]

# Rows of data.csv that are dropped: (problem, the row's text, its line, reason).
BAD_ROWS = [
    (
        "Malformed CSV: wrong number of cells",
        b"Q2,only two\n",
        3,
        "row has 2 cells, the header has 3",
    ),
    ("Unreadable encoding (CSV)", b"Q3,caf\xff,c\n", 4, "invalid UTF-8 (byte 0xff at column 7)"),
    (
        "Malformed CSV: unclosed quote",
        b'Q4,"a,b\n' + b"x" * 140_000 + b"\nQ5,c,d\n",
        5,
        "malformed CSV (field larger than field limit (131072))",
    ),
]

# Whole files that cannot be used: (problem, file name, content or None, message).
BAD_FILES = [
    (
        "Empty dataset",
        "empty.jsonl",
        b"\n\n",
        "empty.jsonl: no usable records: the source holds no records",
    ),
    (
        "No usable record",
        "bad.jsonl",
        b'{"prompt": "", "chosen": "a", "rejected": "b"}\n[1]\n',
        (
            "bad.jsonl: no usable records: read 2, dropped 2 (1 empty prompt, "
            "1 record is an array, expected an object)"
        ),
    ),
    (
        "Malformed JSON document",
        "doc.json",
        b'[{"prompt": "Q",\n "chosen": "a",\n rejected: 1}]',
        (
            "doc.json: malformed JSON (Expecting property name enclosed in double quotes: "
            "line 3 column 2)"
        ),
    ),
    (
        "Unreadable encoding (JSON document)",
        "latin1.json",
        b'[\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n]',
        "latin1.json: invalid UTF-8 at line 2 (byte 0xe9)",
    ),
    (
        "Corrupt gzip",
        "data.jsonl.gz",
        b"this is not gzip",
        "data.jsonl.gz: corrupt gzip stream (Not a gzipped file (b'th'))",
    ),
    ("Missing file", "missing.jsonl", None, "missing.jsonl: file not found"),
    (
        "Unsupported file type",
        "notes.txt",
        b"hello",
        (
            "notes.txt: unsupported file type (expected .jsonl, .ndjson, .json, .csv (each optionally "
            ".gz) or .parquet)"
        ),
    ),
]

# Found only with a tokenizer (--model, here the tiny GPT-2, and --max-length 16).
TOO_LONG = " The quick brown fox jumps over the lazy dog and the dog does not mind at all."
TOKEN_PROBLEMS = [
    (
        "Too long even after truncation",
        json.dumps({"prompt": "Q", "chosen": TOO_LONG, "rejected": "No."}).encode(),
        "too long: a response leaves no room for the prompt within --max-length 16",
        "dropped",
    ),
    (
        "Chat messages but no chat template",
        json.dumps(
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Yes", "rejected": "No"}
        ).encode(),
        "conversational record but the tokenizer has no chat template",
        "dropped",
    ),
    (
        "Prompt too long (kept, cut from the left)",
        json.dumps(
            {
                "prompt": "The quick brown fox jumps over the lazy dog. " * 3,
                "chosen": " Yes",
                "rejected": " No",
            }
        ).encode(),
        "prompt truncated from the left to fit --max-length",
        "altered",
    ),
]

ALTERED = [
    (
        "Windows line endings in HH transcripts",
        json.dumps(
            {
                "chosen": "\r\n\r\nHuman: Q\r\n\r\nAssistant: Yes",
                "rejected": "\r\n\r\nHuman: Q\r\n\r\nAssistant: No",
            }
        ).encode(),
        "normalized CRLF line endings to LF",
    ),
]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Relative file names, so that printed lines read as in the docs (data.jsonl:2: ...)."""
    monkeypatch.chdir(tmp_path)


def _validate(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_validate_lists_every_bad_record_at_its_line_and_exits_1(capsys):
    lines = [GOOD] + [line for _, line, _ in BAD_RECORDS] + [GOOD.replace(b'"b"', b'"c"')]
    Path("data.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    code, out, _ = _validate(capsys, "data.jsonl")

    assert code == 1
    assert out[0] == f"read {len(lines)} records, kept 2"
    problems = [line for line in out if line.startswith("data.jsonl:")]
    assert problems == [
        f"data.jsonl:{n}: {reason} (dropped)"
        for n, (_, _, reason) in enumerate(BAD_RECORDS, start=2)
    ]


def test_validate_reports_csv_rows_at_the_line_they_start_on(capsys):
    Path("data.csv").write_bytes(
        b"prompt,chosen,rejected\nQ1,a,b\n" + b"".join(row for _, row, _, _ in BAD_ROWS)
    )

    code, out, _ = _validate(capsys, "data.csv")

    assert code == 1
    assert [line for line in out if line.startswith("data.csv:")] == [
        f"data.csv:{line}: {reason} (dropped)" for _, _, line, reason in BAD_ROWS
    ]


def test_csv_header_missing_a_column_names_the_field_on_every_row(capsys):
    Path("columns.csv").write_text("prompt,chosen,rejekted\nQ,a,b\nR,c,d\n")

    code, out, err = _validate(capsys, "columns.csv")

    assert code == 1
    assert "columns.csv:2: missing field 'rejected' (dropped)" in out
    assert err == (
        "preftune: error: columns.csv: no usable records: read 2, dropped 2 "
        "(2 missing field 'rejected')\n"
    )


@pytest.mark.parametrize(
    ("problem", "name", "content", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES]
)
def test_unusable_file_is_named_with_the_reason_and_exits_1(
    capsys, problem, name, content, message
):
    if content is not None:
        Path(name).write_bytes(content)

    code, _, err = _validate(capsys, name)

    assert code == 1
    assert err == f"preftune: error: {message}\n"


def test_tokenizer_problems_are_found_with_a_model(capsys, gpt2_folder):
    lines = [GOOD] + [line for _, line, _, _ in TOKEN_PROBLEMS]
    Path("data.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    code, out, _ = _validate(
        capsys, "data.jsonl", "--model", str(gpt2_folder), "--max-length", "16"
    )

    assert code == 1
    assert [line for line in out if line.startswith("data.jsonl:")] == [
        f"data.jsonl:{n}: {reason} ({action})"
        for n, (_, _, reason, action) in enumerate(TOKEN_PROBLEMS, start=2)
    ]
    assert out[0] == "read 4 records, kept 2"
    # The good pair is 1 prompt token + "a" + EOS; the truncated one fills --max-length.
    assert out[3] == (
        "tokens per pair (prompt + longer response): min 3, median 9.5, max 16 (--max-length 16)"
    )


def test_altered_records_are_listed_but_the_data_passes(capsys):
    Path("data.jsonl").write_bytes(b"\n".join([GOOD] + [line for _, line, _ in ALTERED]) + b"\n")

    code, out, _ = _validate(capsys, "data.jsonl", "--report", "report.json")

    assert code == 0
    assert out == [
        "read 2 records, kept 2",
        "dropped 0",
        f"altered 1: 1 {ALTERED[0][2]}",
        f"data.jsonl:2: {ALTERED[0][2]} (altered)",
    ]
    assert json.loads(Path("report.json").read_text())["num_altered"] == 1


def test_clean_data_exits_0_with_the_summary_only(capsys):
    Path("data.jsonl").write_bytes(GOOD + b"\n")

    assert _validate(capsys, "data.jsonl") == (0, ["read 1 records, kept 1", "dropped 0"], "")


def test_training_skips_bad_records_and_lists_them_on_the_console(
    tmp_path, tiny_llama_folder, caplog
):
    rows = [GOOD.replace(b'"b"', f'"b{i}"'.encode()) for i in range(6)]
    rows.insert(2, BAD_RECORDS[0][1])
    Path("data.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    Path("held.jsonl").write_bytes(GOOD + b"\n")

    with caplog.at_level(logging.INFO):
        code = main(
            [
                "train",
                "--model",
                str(tiny_llama_folder),
                "--data",
                "data.jsonl",
                "--eval-data",
                "held.jsonl",
                "--output",
                "run",
                "--max-steps",
                "1",
                "--num-samples",
                "0",
                "--no-progress",
            ]
        )

    assert code == 0
    assert f"  data.jsonl:3: {BAD_RECORDS[0][2]} (dropped)" in caplog.text
    assert "every record dropped or altered is listed in run/data_report.json" in caplog.text
    report = json.loads(Path("run/data_report.json").read_text())
    assert report["entries"] == [
        {"source": "data.jsonl", "record": 3, "reason": BAD_RECORDS[0][2], "action": "dropped"}
    ]


# docs/bad-input.md


def _doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and not set(cells[0]) <= {"-"}:
            rows.append(cells)
    return rows[1:]  # the header row


def _tested_messages() -> dict[str, str]:
    messages = {problem: f"data.jsonl:N: {reason}" for problem, _, reason in BAD_RECORDS}
    messages.update({problem: f"data.csv:N: {reason}" for problem, _, _, reason in BAD_ROWS})
    messages["Header without a required column"] = "columns.csv:N: missing field 'rejected'"
    messages.update({problem: message for problem, _, _, message in BAD_FILES})
    messages.update(
        {problem: f"data.jsonl:N: {reason}" for problem, _, reason, _ in TOKEN_PROBLEMS}
    )
    messages.update({problem: f"data.jsonl:N: {reason}" for problem, _, reason in ALTERED})
    return messages


def test_bad_input_doc_matches_these_tables():
    documented = {row[0]: row[2].strip("`") for row in _doc_rows()}

    assert documented == _tested_messages()


def test_every_test_the_doc_names_exists():
    for row in _doc_rows():
        for reference in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row[3]):
            path, name = reference
            assert f"def {name}(" in (REPO / path).read_text(), f"{path}::{name}"
        assert "tests/" in row[3], row[0]


def test_validate_refuses_a_report_path_that_is_a_folder(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD + b"\n")
    assert main(["validate", str(data), "--report", str(tmp_path)]) == 2
    assert f"--report {tmp_path} is a folder" in capsys.readouterr().err
