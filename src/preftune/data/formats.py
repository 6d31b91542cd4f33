"""Preference-pair formats and their normalization into one `PreferencePair`.

Accepted record shapes (extra fields are ignored):

1. Explicit text: ``prompt``, ``chosen`` and ``rejected`` strings.
2. Implicit text prompt: only ``chosen`` and ``rejected``, two full transcripts in the Anthropic
   HH style (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that share their prompt. The prompt ends
   right after the last ``"\\n\\nAssistant:"`` marker the two transcripts share before they
   diverge, so it always ends at a turn boundary and never inside the first differing word; the
   responses keep their leading space.
3. Conversational: lists of ``{"role", "content"}`` messages. Explicit: ``prompt`` is a list of
   messages and ``chosen``/``rejected`` are lists of assistant messages (a plain string becomes
   one assistant message). Implicit: ``chosen`` and ``rejected`` are full conversations; their
   longest common message prefix, cut back to its last non-assistant message, is the prompt and
   the remaining assistant messages are the responses.

Text is never stripped or rewritten. The one normalization is for HH transcripts written with
Windows line endings (``"\\r\\n\\r\\nAssistant:"``): both transcripts are converted to ``"\\n"``
line endings so that the turn markers are found, and the change is reported as an alteration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"
CRLF_ASSISTANT_MARKER = "\r\n\r\nAssistant:"

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Roles a response may hold: an assistant turn, possibly calling tools and reading their output.
RESPONSE_ROLES = frozenset({"assistant", "tool"})

Messages = tuple[dict, ...]
Content = str | Messages


class BadRecord(ValueError):
    """A record that cannot become a preference pair; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    Either all three parts are text, or all three are tuples of chat messages
    (``{"role": ..., "content": ...}`` dicts); in the latter case `chosen` and `rejected` hold
    the assistant message(s) that continue the prompt.
    """

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    source: str
    record: int

    @property
    def is_conversational(self) -> bool:
        """True when the parts are chat messages rather than plain text."""
        return isinstance(self.prompt, tuple)


def describe_type(value: Any) -> str:
    """Names a value's type in JSON terms, with an article: "null", "a number", "an object"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, Sequence):
        return "an array"
    return f"a {type(value).__name__}"


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two HH-style transcripts into their shared prompt and the two responses.

    The prompt runs up to and including the last ``"\\n\\nAssistant:"`` marker that lies wholly
    inside the common prefix of the two transcripts. Responses keep their leading space, and
    ``prompt + chosen_response == chosen`` (likewise for rejected) always holds.

    Returns:
        ``(prompt, chosen_response, rejected_response)``.

    Raises:
        BadRecord: If the transcripts are identical, hold no assistant marker, differ before
            the final assistant turn, or either response is empty or whitespace only.
    """
    if chosen == rejected:
        raise BadRecord("identical chosen and rejected")
    if ASSISTANT_MARKER not in chosen and ASSISTANT_MARKER not in rejected:
        raise BadRecord(
            "no 'prompt' field and no HH turn marker ('\\n\\nAssistant:') in chosen or rejected"
        )

    common = _common_prefix_length(chosen, rejected)
    boundary = chosen.rfind(ASSISTANT_MARKER, 0, common)
    if boundary < 0:
        raise BadRecord("transcripts differ before the final assistant turn")
    end = boundary + len(ASSISTANT_MARKER)
    prompt, chosen_response, rejected_response = chosen[:end], chosen[end:], rejected[end:]

    if HUMAN_MARKER in chosen_response or HUMAN_MARKER in rejected_response:
        raise BadRecord("transcripts differ before the final assistant turn")
    if not chosen_response.strip():
        raise BadRecord("empty chosen response")
    if not rejected_response.strip():
        raise BadRecord("empty rejected response")
    return prompt, chosen_response, rejected_response


def normalize_record(
    raw: Mapping, source: str, record: int, *, notes: list[str] | None = None
) -> PreferencePair:
    """Turns one raw record in any accepted format into a `PreferencePair`.

    Args:
        raw: The record as read (a JSON object, a CSV row, a Parquet or hub row).
        source: File path or hub id, carried into the pair.
        record: Record number, carried into the pair.
        notes: If given, one reason is appended per alteration made to the record's text, for
            the caller to report.

    Raises:
        BadRecord: If the record cannot be used; the reason names the field at fault.
    """
    if not isinstance(raw, Mapping):
        raise BadRecord(f"record is {describe_type(raw)}, expected an object")
    for field in ("chosen", "rejected"):
        if field not in raw:
            raise BadRecord(f"missing field '{field}'")
    for field in ("prompt", "chosen", "rejected"):
        if field in raw and not _is_text_or_messages(raw[field]):
            raise BadRecord(
                f"field '{field}' is {describe_type(raw[field])}, "
                "expected text or a list of messages"
            )

    for field in ("prompt", "chosen", "rejected"):
        if field in raw:
            check_unicode(field, raw[field])

    if "prompt" in raw:
        prompt, chosen, rejected = _explicit(raw["prompt"], raw["chosen"], raw["rejected"])
    elif isinstance(raw["chosen"], str) and isinstance(raw["rejected"], str):
        prompt, chosen, rejected = _implicit_text(raw["chosen"], raw["rejected"], notes)
    elif isinstance(raw["chosen"], str) or isinstance(raw["rejected"], str):
        raise BadRecord("fields 'chosen' and 'rejected' mix text and messages")
    else:
        prompt, chosen, rejected = _implicit_messages(raw["chosen"], raw["rejected"])

    if chosen == rejected:
        raise BadRecord("identical chosen and rejected")
    return PreferencePair(prompt, chosen, rejected, source=source, record=record)


def check_unicode(field: str, value: Any) -> None:
    """Refuse text that UTF-8 cannot encode: a lone surrogate such as ``\\ud800``, which
    JSON's ``\\u`` escapes can spell but no tokenizer accepts. ``value`` is text or a list
    of messages; anything else is left to the type checks."""
    if isinstance(value, str):
        texts = [value]
    elif _is_text_or_messages(value):
        texts = [m.get("content") for m in value if isinstance(m, Mapping)]
    else:
        return
    for text in texts:
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRecord(
                f"field '{field}' has a lone surrogate {text[err.start]!r} at character "
                f"{err.start}: not valid Unicode text"
            ) from None


def _is_text_or_messages(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray))
    )


def _common_prefix_length(a: Sequence, b: Sequence) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _explicit(prompt: Any, chosen: Any, rejected: Any) -> tuple[Content, Content, Content]:
    if isinstance(prompt, str):
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise BadRecord(f"field '{field}' is a list of messages but 'prompt' is text")
        if not prompt.strip():
            raise BadRecord("empty prompt")
        _check_text_response("chosen", chosen)
        _check_text_response("rejected", rejected)
        return prompt, chosen, rejected

    prompt_messages = _messages("prompt", prompt)
    _check_prompt(prompt_messages)
    return (
        prompt_messages,
        _response_messages("chosen", chosen),
        _response_messages("rejected", rejected),
    )


def _implicit_text(chosen: str, rejected: str, notes: list[str] | None) -> tuple[str, str, str]:
    if CRLF_ASSISTANT_MARKER in chosen or CRLF_ASSISTANT_MARKER in rejected:
        chosen, rejected = chosen.replace("\r\n", "\n"), rejected.replace("\r\n", "\n")
        if notes is not None:
            notes.append("normalized CRLF line endings to LF")
    return split_transcripts(chosen, rejected)


def _implicit_messages(chosen: Any, rejected: Any) -> tuple[Messages, Messages, Messages]:
    chosen_messages = _messages("chosen", chosen)
    rejected_messages = _messages("rejected", rejected)
    if chosen_messages == rejected_messages:
        raise BadRecord("identical chosen and rejected")
    for field, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        if not messages:
            raise BadRecord(f"empty {field} response")

    # The prompt is the shared prefix, cut back so that it never ends on an assistant turn.
    cut = _common_prefix_length(chosen_messages, rejected_messages)
    while cut > 0 and chosen_messages[cut - 1]["role"] == "assistant":
        cut -= 1
    prompt = chosen_messages[:cut]
    if not prompt:
        if chosen_messages[0]["role"] == rejected_messages[0]["role"] == "assistant":
            raise BadRecord("empty prompt")  # neither conversation has a turn before the answer
        raise BadRecord("transcripts differ before the final assistant turn")
    for messages in (chosen_messages[cut:], rejected_messages[cut:]):
        if any(message["role"] not in RESPONSE_ROLES for message in messages):
            raise BadRecord("transcripts differ before the final assistant turn")

    _check_prompt(prompt)
    chosen_response = _response_messages("chosen", chosen_messages[cut:])
    rejected_response = _response_messages("rejected", rejected_messages[cut:])
    return prompt, chosen_response, rejected_response


def _check_text_response(field: str, response: str) -> None:
    if not response.strip():
        raise BadRecord(f"empty {field} response")


def _check_prompt(prompt: Messages) -> None:
    if not any(message["content"].strip() for message in prompt):
        raise BadRecord("empty prompt")
    if prompt[-1]["role"] == "assistant":
        raise BadRecord("prompt ends with an assistant message")


def _response_messages(field: str, value: Any) -> Messages:
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    messages = _messages(field, value)
    for message in messages:
        if message["role"] not in RESPONSE_ROLES:
            raise BadRecord(
                f"'{field}' holds a '{message['role']}' message; "
                "responses must be assistant messages"
            )
    if not messages or not any(
        message["content"].strip() for message in messages if message["role"] == "assistant"
    ):
        raise BadRecord(f"empty {field} response")
    if messages[-1]["role"] != "assistant":
        raise BadRecord(f"{field} response does not end with an assistant message")
    return messages


def _messages(field: str, value: Any) -> Messages:
    """Validates a list of chat messages and returns it as a tuple of fresh dicts."""
    if isinstance(value, str) or not _is_text_or_messages(value):
        raise BadRecord(f"field '{field}' is {describe_type(value)}, expected a list of messages")
    messages = []
    for message in value:
        if not isinstance(message, Mapping):
            raise BadRecord(f"message in '{field}' is {describe_type(message)}, expected an object")
        for key in ("role", "content"):
            if key not in message:
                raise BadRecord(f"message in '{field}' has no '{key}'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str):
            raise BadRecord(f"message role in '{field}' is {describe_type(role)}, expected text")
        if role not in ROLES:
            raise BadRecord(f"unknown role {role[:40]!r} in '{field}'")
        if not isinstance(content, str):
            raise BadRecord(
                f"message content in '{field}' is {describe_type(content)}, expected text"
            )
        messages.append(dict(message))
    return tuple(messages)
