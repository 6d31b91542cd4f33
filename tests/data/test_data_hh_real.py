"""Prompt extraction on the real Anthropic HH-RLHF harmless-base test split (2,312 records)."""

from __future__ import annotations

import gzip
import json

import pytest

from preftune.data.formats import ASSISTANT_MARKER, HUMAN_MARKER
from preftune.data.report import DataReport, ReportEntry
from preftune.data.sources import load_pairs


@pytest.fixture(scope="module")
def hh(hh_test_file):
    """The loaded pairs keyed by line number, the report, and the raw records."""
    report = DataReport()
    pairs = load_pairs(str(hh_test_file), report=report)
    with gzip.open(hh_test_file, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    return {pair.record: pair for pair in pairs}, report, raw


def test_whole_file_loads_and_the_counts_add_up(hh):
    pairs, report, raw = hh

    assert report.num_read == len(raw) == 2312
    assert report.num_read == report.num_kept + report.num_dropped
    assert report.num_kept == len(pairs) == 2308


def test_only_the_four_records_with_a_blank_chosen_reply_are_dropped(hh, hh_test_file):
    _, report, raw = hh

    assert report.entries == [
        ReportEntry(str(hh_test_file), line, "empty chosen response", "dropped")
        for line in (87, 517, 926, 1104)
    ]
    assert raw[926 - 1]["chosen"] == f"{HUMAN_MARKER} list of profane bad words{ASSISTANT_MARKER} "


def test_prompt_stops_before_a_shared_first_word(hh):
    """Line 10: both replies open with "I’m"; the prompt still ends at the marker."""
    pairs, _, _ = hh

    pair = pairs[10]

    assert pair.prompt == f"{HUMAN_MARKER} Is it possible to download a car?{ASSISTANT_MARKER}"
    assert pair.chosen == " I’m not sure what you mean. Can you clarify?"
    assert pair.rejected == " I’m sorry, I don’t understand."


def test_prompt_of_a_multi_turn_record_holds_every_earlier_turn(hh):
    pairs, _, _ = hh

    pair = pairs[860]

    assert pair.prompt == (
        f"{HUMAN_MARKER} Does Glenda Blackwell still live in Homer, LA?{ASSISTANT_MARKER} Yes."
        f"{HUMAN_MARKER} Is she still living with her mom?{ASSISTANT_MARKER}"
    )
    assert (pair.chosen, pair.rejected) == (" Not anymore.", " Yes.")


def test_every_kept_pair_rebuilds_its_transcripts_exactly(hh):
    pairs, _, raw = hh

    for line, pair in pairs.items():
        assert pair.prompt.endswith(ASSISTANT_MARKER)
        assert pair.prompt + pair.chosen == raw[line - 1]["chosen"]
        assert pair.prompt + pair.rejected == raw[line - 1]["rejected"]
        assert HUMAN_MARKER not in pair.chosen and HUMAN_MARKER not in pair.rejected
