"""Prompt extraction and record normalization for every accepted format."""

from __future__ import annotations

import pytest

from preftune.data.formats import BadRecord, PreferencePair, normalize_record, split_transcripts

H, A = "\n\nHuman:", "\n\nAssistant:"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _reason(raw: object) -> str:
    with pytest.raises(BadRecord) as caught:
        normalize_record(raw, "data.jsonl", 1)
    return caught.value.reason


# HH transcripts: split_transcripts


def test_prompt_ends_at_the_marker_when_responses_differ_in_their_first_word():
    """ "Sure" and "Surely" share four letters; none of them belongs in the prompt."""
    chosen = f"{H} Can you help?{A} Sure thing."
    rejected = f"{H} Can you help?{A} Surely not."

    assert split_transcripts(chosen, rejected) == (
        f"{H} Can you help?{A}",
        " Sure thing.",
        " Surely not.",
    )


def test_prompt_ends_at_the_marker_when_responses_share_whole_words():
    chosen = f"{H} Hi{A} I think so, yes."
    rejected = f"{H} Hi{A} I think not."

    assert split_transcripts(chosen, rejected) == (
        f"{H} Hi{A}",
        " I think so, yes.",
        " I think not.",
    )


def test_prompt_keeps_earlier_turns_of_a_multi_turn_transcript():
    shared = f"{H} Hello{A} Hi!{H} Tell me a joke.{A}"

    prompt, chosen, rejected = split_transcripts(shared + " Why did...", shared + " No.")

    assert (prompt, chosen, rejected) == (shared, " Why did...", " No.")


def test_response_that_is_a_prefix_of_the_other_is_kept():
    prompt, chosen, rejected = split_transcripts(f"{H} Q{A} Yes", f"{H} Q{A} Yes, and more")

    assert (prompt, chosen, rejected) == (f"{H} Q{A}", " Yes", " Yes, and more")


def test_responses_keep_leading_whitespace_and_inner_newlines():
    _, chosen, rejected = split_transcripts(f"{H} Q{A}  Two\nlines", f"{H} Q{A}\tTab")

    assert (chosen, rejected) == ("  Two\nlines", "\tTab")


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        (f"{H} Q{A} Same", f"{H} Q{A} Same", "identical chosen and rejected"),
        (f"{H} Q{A}", f"{H} Q{A} Text", "empty chosen response"),
        (f"{H} Q{A} Text", f"{H} Q{A}  \n ", "empty rejected response"),
        (f"{H} Q one{A} Same", f"{H} Q two{A} Same", "transcripts differ before the final"),
        (f"{H} Q{A} A{H} More{A} B", f"{H} Q{A} C", "transcripts differ before the final"),
        (f"{H} Q{A} A", f"{H} Q{A} A{H} More{A} B", "transcripts differ before the final"),
        ("plain text one", "plain text two", "no 'prompt' field and no HH turn marker"),
    ],
    ids=[
        "identical",
        "empty-chosen",
        "whitespace-rejected",
        "first-human-turn-differs",
        "chosen-has-extra-turns",
        "rejected-has-extra-turns",
        "no-marker",
    ],
)
def test_unusable_transcripts_are_refused_with_a_specific_reason(chosen, rejected, reason):
    with pytest.raises(BadRecord) as caught:
        split_transcripts(chosen, rejected)

    assert caught.value.reason.startswith(reason)


# normalize_record: accepted formats


def test_explicit_text_record_is_kept_verbatim():
    pair = normalize_record(
        {"prompt": " Q?\r\n", "chosen": " yes ", "rejected": "no", "id": 7}, "d.jsonl", 4
    )

    assert pair == PreferencePair(" Q?\r\n", " yes ", "no", source="d.jsonl", record=4)
    assert not pair.is_conversational


def test_implicit_hh_record_gets_its_prompt_extracted():
    pair = normalize_record({"chosen": f"{H} Q{A} Good", "rejected": f"{H} Q{A} Bad"}, "hh", 2)

    assert (pair.prompt, pair.chosen, pair.rejected) == (f"{H} Q{A}", " Good", " Bad")


def test_crlf_hh_transcripts_are_normalized_and_the_change_noted():
    notes: list[str] = []
    raw = {"chosen": "\r\n\r\nHuman: Q\r\n\r\nAssistant: Good", "rejected": "\r\n\r\nHuman: Q"}
    raw["rejected"] += "\r\n\r\nAssistant: Bad\r\nidea"

    pair = normalize_record(raw, "hh.csv", 2, notes=notes)

    assert (pair.prompt, pair.chosen, pair.rejected) == (f"{H} Q{A}", " Good", " Bad\nidea")
    assert notes == ["normalized CRLF line endings to LF"]


def test_lf_hh_transcripts_produce_no_alteration_note():
    notes: list[str] = []
    normalize_record(
        {"chosen": f"{H} Q{A} A\r\nB", "rejected": f"{H} Q{A} C"}, "hh", 1, notes=notes
    )

    assert notes == []


def test_explicit_conversation_turns_string_responses_into_assistant_messages():
    prompt = [{"role": "system", "content": "Be brief."}, _user("2+2?")]

    pair = normalize_record(
        {"prompt": prompt, "chosen": "4", "rejected": [_assistant("5")]}, "c", 1
    )

    assert pair.is_conversational
    assert pair.prompt == tuple(prompt)
    assert pair.chosen == (_assistant("4"),)
    assert pair.rejected == (_assistant("5"),)


def test_implicit_conversation_splits_at_the_last_shared_user_turn():
    shared = [_user("Hi"), _assistant("Hello!"), _user("A joke?")]

    pair = normalize_record(
        {"chosen": [*shared, _assistant("Knock knock.")], "rejected": [*shared, _assistant("No.")]},
        "c",
        1,
    )

    assert pair.prompt == tuple(shared)
    assert pair.chosen == (_assistant("Knock knock."),)
    assert pair.rejected == (_assistant("No."),)


def test_implicit_conversation_never_ends_its_prompt_on_a_shared_assistant_message():
    """Both responses open with the same assistant message; it stays in the responses."""
    chosen = [_user("Q"), _assistant("Well."), _assistant("Yes.")]
    rejected = [_user("Q"), _assistant("Well."), _assistant("No.")]

    pair = normalize_record({"chosen": chosen, "rejected": rejected}, "c", 1)

    assert pair.prompt == (_user("Q"),)
    assert pair.chosen == tuple(chosen[1:])
    assert pair.rejected == tuple(rejected[1:])


def test_messages_are_copied_so_later_edits_to_the_input_do_not_leak():
    prompt = [_user("Q")]
    pair = normalize_record({"prompt": prompt, "chosen": "a", "rejected": "b"}, "c", 1)

    prompt[0]["content"] = "changed"

    assert pair.prompt == (_user("Q"),)


# normalize_record: unusable records


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([1, 2], "record is an array, expected an object"),
        ({"prompt": "Q", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "Q", "rejected": "a"}, "missing field 'chosen'"),
        (
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            "field 'prompt' is a number, expected text or a list of messages",
        ),
        (
            {"prompt": "Q", "chosen": None, "rejected": "b"},
            "field 'chosen' is null, expected text or a list of messages",
        ),
        (
            {"prompt": "Q", "chosen": "a", "rejected": {"text": "b"}},
            "field 'rejected' is an object, expected text or a list of messages",
        ),
        (
            {"prompt": "Q", "chosen": True, "rejected": "b"},
            "field 'chosen' is a boolean, expected text or a list of messages",
        ),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty prompt"),
        ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "empty prompt"),
        ({"prompt": "Q", "chosen": "", "rejected": "b"}, "empty chosen response"),
        ({"prompt": "Q", "chosen": "a", "rejected": "\t"}, "empty rejected response"),
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical chosen and rejected"),
        (
            {"prompt": "Q", "chosen": [_assistant("a")], "rejected": "b"},
            "field 'chosen' is a list of messages but 'prompt' is text",
        ),
        (
            {"chosen": f"{H} Q{A} a", "rejected": [_user("Q"), _assistant("b")]},
            "fields 'chosen' and 'rejected' mix text and messages",
        ),
    ],
)
def test_unusable_record_is_refused_with_a_reason_naming_the_field(raw, reason):
    assert _reason(raw) == reason


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ([], "empty prompt"),
        ([_user("  ")], "empty prompt"),
        (["hi"], "message in 'prompt' is text, expected an object"),
        ([{"content": "hi"}], "message in 'prompt' has no 'role'"),
        ([{"role": "user"}], "message in 'prompt' has no 'content'"),
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot' in 'prompt'"),
        ([{"role": 1, "content": "hi"}], "message role in 'prompt' is a number, expected text"),
        ([{"role": "user", "content": None}], "message content in 'prompt' is null, expected text"),
        ([_user("Q"), _assistant("A")], "prompt ends with an assistant message"),
    ],
)
def test_unusable_prompt_messages_are_refused(prompt, reason):
    assert _reason({"prompt": prompt, "chosen": "a", "rejected": "b"}) == reason


@pytest.mark.parametrize(
    ("chosen", "reason"),
    [
        ([], "empty chosen response"),
        ([_assistant(" ")], "empty chosen response"),
        ([_user("a")], "'chosen' holds a 'user' message; responses must be assistant messages"),
        (
            [_assistant("a"), {"role": "tool", "content": "42"}],
            "chosen response does not end with an assistant message",
        ),
    ],
)
def test_unusable_response_messages_are_refused(chosen, reason):
    assert _reason({"prompt": [_user("Q")], "chosen": chosen, "rejected": "b"}) == reason


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ([_user("Q"), _assistant("a")], [_user("Q"), _assistant("a")], "identical chosen and"),
        ([_user("Q1"), _assistant("a")], [_user("Q2"), _assistant("b")], "transcripts differ"),
        (
            [_user("Q"), _assistant("a"), _user("More")],
            [_user("Q"), _assistant("b")],
            "transcripts differ",
        ),
        ([_assistant("a")], [_assistant("b")], "empty prompt"),
        ([_assistant("x"), _assistant("a")], [_assistant("x"), _assistant("b")], "empty prompt"),
        ([], [_user("Q"), _assistant("b")], "empty chosen response"),
    ],
    ids=[
        "identical",
        "first-turn-differs",
        "extra-user-turn",
        "no-user-turn",
        "shared-assistant-opening",
        "empty-conversation",
    ],
)
def test_unusable_implicit_conversations_are_refused(chosen, rejected, reason):
    assert _reason({"chosen": chosen, "rejected": rejected}).startswith(reason)
