"""Tokenizing preference pairs so that chosen and rejected share the same prompt tokens.

The prompt and each response are tokenized separately, then concatenated. This keeps the
prompt tokens of both sequences identical, which the DPO loss relies on (the prompt's
log-prob cancels only if it is the same sequence in both).

Rules, for every tokenizer:
- exactly one BOS at the start, where the tokenizer uses one (chat templates that already
  write it are not given a second);
- each response ends with exactly one end-of-turn token: the chat template's own (for
  SmolLM2 ``<|im_end|>``; the newline a template writes after it belongs to the next turn
  and is dropped), or EOS appended to plain text;
- too long pairs lose prompt tokens from the left (after the BOS); responses are never cut,
  so a pair keeps all its response tokens, and a pair whose response cannot fit is dropped
  and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.data.formats import BadRecord, PreferencePair
from preftune.data.report import DataError, DataReport


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source: str
    record: int
    prompt_text: str  # as rendered, for generating samples from the same prompt
    # (chosen, rejected) reference log-probs when precomputed; travels with the pair so that
    # shuffling and epochs cannot misalign them.
    reference_logps: tuple[float, float] | None = None

    @property
    def num_tokens(self) -> int:
        """Real tokens in both sequences of the pair, as the model sees them."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


class PairTokenizer:
    """Turns :class:`PreferencePair` objects into token ids for one tokenizer."""

    def __init__(self, tokenizer, max_length: int, chat_template: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template = chat_template
        with_special = tokenizer("a", add_special_tokens=True).input_ids
        without = tokenizer("a", add_special_tokens=False).input_ids
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and with_special[:1] == [bos] != without[:1] else None
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; responses could not be closed")

    def render(self, pair: PreferencePair) -> tuple[str, str, str]:
        """Return ``(prompt_text, chosen_text, rejected_text)`` as the model will read them."""
        use_template = pair.is_conversational or self.chat_template == "always"
        if not use_template:
            return pair.prompt, pair.chosen, pair.rejected
        if self.chat_template == "never":
            raise BadRecord("conversational record but --chat-template never")
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRecord("conversational record but the tokenizer has no chat template")
        prompt = _as_messages(pair.prompt, "user")
        prompt_text = self.tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        responses = []
        for response in (pair.chosen, pair.rejected):
            full = self.tokenizer.apply_chat_template(
                prompt + _as_messages(response, "assistant"), tokenize=False
            )
            if not full.startswith(prompt_text):
                raise BadRecord("the chat template renders the prompt differently with a response")
            # What follows the end-of-turn token (a newline) belongs to the next turn.
            responses.append(full[len(prompt_text) :].rstrip())
        return prompt_text, responses[0], responses[1]

    def encode_prompt(self, prompt_text: str) -> list[int]:
        ids = self.tokenizer(prompt_text, add_special_tokens=False).input_ids
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def encode_response(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def __call__(self, pair: PreferencePair) -> tuple[TokenizedPair, int]:
        """Tokenize one pair; returns it and the number of prompt tokens cut off.

        Raises:
            BadRecord: the pair cannot be used (its response alone does not fit, ...).
        """
        prompt_text, chosen_text, rejected_text = self.render(pair)
        prompt = self.encode_prompt(prompt_text)
        chosen = self.encode_response(chosen_text)
        rejected = self.encode_response(rejected_text)
        longest = max(len(chosen), len(rejected))
        keep_first = 1 if self.bos_id is not None else 0
        room = self.max_length - longest  # prompt tokens that fit
        if room < keep_first + 1:
            raise BadRecord(
                # One reason for every such pair, so the report counts them together.
                f"too long: a response leaves no room for the prompt within --max-length "
                f"{self.max_length}"
            )
        cut = max(0, len(prompt) - room)
        if cut:
            prompt = prompt[:keep_first] + prompt[keep_first + cut :]
        tokenized = TokenizedPair(
            tuple(prompt), tuple(chosen), tuple(rejected), pair.source, pair.record, prompt_text
        )
        return tokenized, cut


def tokenize_pairs(
    pairs: list[PreferencePair],
    pair_tokenizer: PairTokenizer,
    report: DataReport,
    on_bad_record: str = "skip",
) -> list[TokenizedPair]:
    """Tokenize every pair, reporting truncated (altered) and unusable (dropped) ones."""
    out = []
    for pair in pairs:
        try:
            tokenized, cut = pair_tokenizer(pair)
        except BadRecord as err:
            if on_bad_record == "error":
                raise DataError(pair.source, pair.record, str(err)) from None
            report.add(pair.source, pair.record, str(err), action="dropped")
            continue
        if cut:
            report.add(
                pair.source,
                pair.record,
                "prompt truncated from the left to fit --max-length",
                action="altered",
            )
        out.append(tokenized)
    return out


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [dict(m) for m in value]
