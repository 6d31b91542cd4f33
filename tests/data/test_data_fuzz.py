"""Property-based tests: any input gives pairs, a BadRecord or a DataError, and nothing else."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.formats import (
    ASSISTANT_MARKER,
    HUMAN_MARKER,
    BadRecord,
    PreferencePair,
    normalize_record,
    split_transcripts,
)
from preftune.data.report import DataError, DataReport
from preftune.data.sources import load_pairs

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)

# Pieces of HH transcripts, so that random text often holds markers and shared prefixes.
transcripts = st.lists(
    st.sampled_from([HUMAN_MARKER, ASSISTANT_MARKER, " Sure", " Surely", " no", "\n", " ", "x"]),
    max_size=8,
).map("".join)

messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]),
            "content": st.sampled_from(["", " ", "Hi", "Yes", "No"]) | json_values,
        }
    ),
    max_size=4,
)

records = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "extra"]),
    transcripts | messages | json_values,
    max_size=4,
)

# Lines that look like data, interleaved with bytes that break it.
fragments = st.lists(
    st.sampled_from(
        [
            b'{"prompt": "Q", "chosen": "a", "rejected": "b"}',
            b'{"chosen": "\\n\\nHuman: Q\\n\\nAssistant: a", "rejected": "x"}',
            b"prompt,chosen,rejected",
            b'"Q","[{""role"": ""assistant"", ""content"": ""a""}]",b',
            b"\n",
            b"\r",
            b",",
            b'"',
            b"[",
            b"{",
            b"\xff",
            b"\x00",
            b"\xef\xbb\xbf",
        ]
    ),
    max_size=12,
).map(b"".join)

file_bytes = st.binary(max_size=300) | fragments


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _load_or_data_error(path: Path) -> list[PreferencePair] | None:
    """Loads `path`; returns None on DataError and checks the report's counts otherwise."""
    report = DataReport()
    try:
        pairs = load_pairs(str(path), report=report)
    except DataError as error:
        assert str(error).startswith(str(path))
        return None
    assert report.num_kept == len(pairs) > 0
    assert report.num_read == report.num_kept + report.num_dropped
    assert all(isinstance(pair, PreferencePair) for pair in pairs)
    return pairs


@FUZZ
@given(data=file_bytes)
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_random_bytes_give_pairs_or_a_data_error(scratch, suffix, data):
    path = scratch / f"random{suffix}"
    path.write_bytes(data)

    _load_or_data_error(path)


@FUZZ
@given(data=file_bytes)
def test_random_bytes_in_a_gzipped_csv_give_pairs_or_a_data_error(scratch, data):
    path = scratch / "random.csv.gz"
    path.write_bytes(gzip.compress(data))

    _load_or_data_error(path)


@FUZZ
@given(values=st.lists(json_values | records, max_size=5))
def test_random_json_values_give_pairs_or_a_data_error(scratch, values):
    lines = scratch / "values.jsonl"
    lines.write_text("".join(json.dumps(value) + "\n" for value in values))
    document = scratch / "values.json"
    document.write_text(json.dumps(values))

    from_lines = _load_or_data_error(lines)
    from_document = _load_or_data_error(document)

    content = [(p.prompt, p.chosen, p.rejected) for p in from_lines or []]
    assert content == [(p.prompt, p.chosen, p.rejected) for p in from_document or []]


@FUZZ
@given(raw=json_values | records)
def test_random_record_normalizes_or_is_refused(raw):
    try:
        pair = normalize_record(raw, "fuzz.jsonl", 1)
    except BadRecord as bad:
        assert bad.reason
        return
    assert pair.chosen != pair.rejected
    assert isinstance(pair.chosen, type(pair.prompt))
    assert isinstance(pair.rejected, type(pair.prompt))


@FUZZ
@given(chosen=transcripts, rejected=transcripts)
def test_split_transcripts_cuts_at_a_shared_assistant_marker(chosen, rejected):
    try:
        prompt, chosen_response, rejected_response = split_transcripts(chosen, rejected)
    except BadRecord:
        return
    assert prompt.endswith(ASSISTANT_MARKER)
    assert prompt + chosen_response == chosen
    assert prompt + rejected_response == rejected
    assert HUMAN_MARKER not in chosen_response and HUMAN_MARKER not in rejected_response
    assert chosen_response.strip() and rejected_response.strip()
