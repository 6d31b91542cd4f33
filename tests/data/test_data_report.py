"""DataReport bookkeeping and DataError messages."""

from __future__ import annotations

import json
import pickle

import pytest

from preftune.data.report import DataError, DataReport


def _report_with_drops() -> DataReport:
    report = DataReport()
    report.mark_read("train.jsonl", 10)
    report.mark_read("eval.csv", 2)
    for record in (3, 5, 9):
        report.add("train.jsonl", record, "empty chosen response")
    report.add("train.jsonl", 7, "identical chosen and rejected")
    report.add("eval.csv", 2, "normalized CRLF line endings to LF", action="altered")
    return report


def test_counts_add_up_to_records_read():
    report = _report_with_drops()

    assert report.num_read == 12
    assert report.num_dropped == 4
    assert report.num_kept == 8
    assert report.num_altered == 1
    assert report.counts() == {"empty chosen response": 3, "identical chosen and rejected": 1}
    assert report.counts("altered") == {"normalized CRLF line endings to LF": 1}


def test_counts_list_the_most_frequent_reason_first():
    report = DataReport()
    report.add("a.jsonl", 1, "rare")
    for record in (2, 3):
        report.add("a.jsonl", record, "common")

    assert list(report.counts()) == ["common", "rare"]


def test_summary_names_read_kept_and_each_reason():
    assert _report_with_drops().summary() == (
        "read 12 records, kept 8\n"
        "dropped 4: 3 empty chosen response, 1 identical chosen and rejected\n"
        "altered 1: 1 normalized CRLF line endings to LF"
    )


def test_summary_of_a_clean_dataset_says_nothing_was_dropped():
    report = DataReport()
    report.mark_read("clean.jsonl", 5)

    assert report.summary() == "read 5 records, kept 5\ndropped 0"


def test_written_report_is_json_with_every_entry(tmp_path):
    report = _report_with_drops()

    path = report.write(tmp_path / "run" / "data_report.json")

    loaded = json.loads(path.read_text())
    assert loaded == report.to_dict()
    assert loaded["num_read"] == 12
    assert loaded["num_kept"] == 8
    assert loaded["read_by_source"] == {"train.jsonl": 10, "eval.csv": 2}
    assert loaded["entries"][0] == {
        "source": "train.jsonl",
        "record": 3,
        "reason": "empty chosen response",
        "action": "dropped",
    }
    assert loaded["entries"][-1]["action"] == "altered"


def test_unknown_action_is_refused():
    with pytest.raises(ValueError, match="action must be one of"):
        DataReport().add("a.jsonl", 1, "why", action="fixed")


def test_data_error_message_names_source_record_and_reason():
    error = DataError("data.jsonl", 41, "malformed JSON (Expecting ',' delimiter: column 18)")

    assert str(error) == "data.jsonl:41: malformed JSON (Expecting ',' delimiter: column 18)"
    assert (error.source, error.record) == ("data.jsonl", 41)
    assert isinstance(error, ValueError)


def test_data_error_about_a_whole_source_has_no_record_number():
    assert (
        str(DataError("missing.jsonl", None, "file not found")) == "missing.jsonl: file not found"
    )


def test_data_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DataError("a.csv", 3, "row has 2 cells, the header has 3")))

    assert str(error) == "a.csv:3: row has 2 cells, the header has 3"
    assert error.record == 3
