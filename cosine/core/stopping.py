"""Stop conditions and incremental detokenization, with the client protocol's text rules.

- A character split across tokens is never emitted half-done (the decoder's U+FFFD is held).
- Text that might be the start of a stop string is held back until it is known not to be.
- The stop string itself is left out of the text; tokens past the one that completes it, past
  EOS or past ``max_tokens`` are clipped.
- The ``text`` pieces returned by ``extend`` joined equal the final ``text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Detokenizer(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


DECODE_OVERLAP = 6  # tokens decoded again before a round's new ones (incremental detokenization)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class StopRules:
    max_tokens: int
    eos_token_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True, slots=True)
class Emission:
    """What one round adds to the output: token ids, the text now safe to show, and the finish
    reason when the request is done."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


@dataclass(slots=True)
class OutputAssembler:
    tokenizer: Detokenizer
    rules: StopRules
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    finish_reason: str | None = None

    def extend(self, new_tokens: Sequence[int]) -> Emission:
        """Append a round's tokens; clip at EOS, max_tokens or a stop string."""
        if self.finish_reason is not None:
            raise ValueError("request already finished")
        start = len(self.token_ids)
        accepted, finish = self._clip_by_tokens(new_tokens)
        self.token_ids.extend(accepted)
        self.text = self._text_with_appended(start)
        stop_at = self._find_stop(self.text)
        if stop_at is not None:
            self._clip_to_stop(start, stop_at)
            finish = FINISH_STOP
        self.finish_reason = finish
        safe = len(self.text) if finish else self._safe_length(self.text)
        piece = self.text[self.emitted_chars : max(safe, self.emitted_chars)]
        self.emitted_chars += len(piece)
        return Emission(tuple(self.token_ids[start:]), piece, finish)

    def _clip_by_tokens(self, new_tokens: Sequence[int]) -> tuple[list[int], str | None]:
        accepted: list[int] = []
        for token in new_tokens:
            accepted.append(int(token))
            if int(token) in self.rules.eos_token_ids:
                return accepted, FINISH_STOP
            if len(self.token_ids) + len(accepted) >= self.rules.max_tokens:
                return accepted, FINISH_LENGTH
        return accepted, None

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _text_with_appended(self, start: int) -> str:
        """The text of all tokens, given ``self.text`` is that of the first ``start``: decodes
        only the new tokens with a few before them (a token's text can depend on its
        neighbours: spaces, bytes of one character), so a round costs what it adds, not the
        whole output. Where the splice is not certain (a character left incomplete, the
        overlap decoding differently alone), the whole output is decoded."""
        if start == len(self.token_ids):
            return self.text  # nothing appended
        if start == 0:
            return self._decode(self.token_ids)
        low = max(0, start - DECODE_OVERLAP)
        before = self._decode(self.token_ids[low:start])
        after = self._decode(self.token_ids[low:])
        if "\ufffd" in before or not after.startswith(before) or not self.text.endswith(before):
            return self._decode(self.token_ids)
        return self.text + after[len(before) :]

    def _find_stop(self, text: str) -> int | None:
        # Only text not yet emitted can hold a new stop string (emitted text was checked).
        positions = [text.find(s, self._search_from()) for s in self.rules.stop_strings]
        positions = [p for p in positions if p >= 0]
        return min(positions) if positions else None

    def _search_from(self) -> int:
        longest = max((len(s) for s in self.rules.stop_strings), default=0)
        return max(0, self.emitted_chars - longest + 1)

    def _clip_to_stop(self, round_start: int, stop_at: int) -> None:
        # Keep tokens up to the one whose text completes the stop string; drop the rest.
        # The text is cut where a stop string first appears in that prefix: a stop string that
        # starts earlier but completes in a later token would never have been generated.
        for end in range(round_start + 1, len(self.token_ids) + 1):
            prefix_text = self._decode(self.token_ids[:end])
            prefix_stop = self._find_stop(prefix_text)
            if prefix_stop is not None:
                del self.token_ids[end:]
                stop_at = prefix_stop
                break
        self.text = self.text[:stop_at]

    def _safe_length(self, text: str) -> int:
        safe = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character waits for its rest
        held = 0
        for stop in self.rules.stop_strings:
            for size in range(min(len(stop) - 1, safe), held, -1):
                if text[safe - size : safe] == stop[:size]:
                    held = size
                    break
        return safe - held
