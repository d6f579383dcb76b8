"""Log-probabilities of the emitted tokens under the target, and how clients see them.

The verifier has the target's logits at every position it verifies: each emitted token's
log-probability, and the most likely alternatives there, cost one log-softmax per emitted token.
They are those of the target's *raw* distribution (before temperature and top-p), as vLLM
reports them by default; at temperature 0 the emitted token is the most likely one.

``cosine.core.acceptance.emitted_logprobs`` (verifier side, torch) gives, per emitted token,
``[logprob, top ids, top logprobs]``; ``token_logprobs`` (coordinator side, given a tokenizer;
no torch) turns those into the client protocol's entries: ``{"id", "token", "bytes", "logprob", "top_logprobs": [...]}`` aligned with a
``tokens`` entry's ``token_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


class LogprobsError(ValueError):
    """The verifier's log-probability rows do not fit the round's tokens."""


def token_logprobs(tokenizer, token_ids: Sequence[int], logprobs: Sequence[Any]) -> list[dict]:
    """The client protocol's entries for ``token_ids`` (a prefix of the round's emitted tokens,
    ``logprobs`` the verifier's rows for them). Rows that do not fit raise ``LogprobsError``."""
    if len(logprobs) < len(token_ids):
        raise LogprobsError(f"{len(logprobs)} log-probability rows for {len(token_ids)} tokens")
    texts = _TokenTexts(tokenizer)
    entries = []
    for token, row in zip(token_ids, logprobs):
        try:
            value, ids, values = row
            if len(ids) != len(values) or len(ids) > MAX_TOP_LOGPROBS:
                raise ValueError("unequal or too many alternatives")
            entry = {"id": int(token), **texts.of(int(token)), "logprob": float(value)}
            entry["top_logprobs"] = [{"id": int(i), **texts.of(int(i)), "logprob": float(v)} for i, v in zip(ids, values)]
        except (TypeError, ValueError, OverflowError) as error:
            raise LogprobsError(f"a log-probability row must be [logprob, [ids], [logprobs]]: {error}") from None
        entries.append(entry)
    return entries


class _TokenTexts:
    """A token's text and exact bytes: byte-level BPE vocabularies (GPT-2's, SmolLM's) map each
    byte to a printable character, which is undone here, so a token holding part of a multi-byte
    character has its true bytes (its ``token`` text then shows U+FFFD); other tokenizers give
    the UTF-8 of the token decoded alone."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    def of(self, token: int) -> dict:
        raw = None
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str):
                decoder = _byte_decoder()
                if all(c in decoder for c in piece):
                    raw = bytes(decoder[c] for c in piece)
        if raw is None:
            raw = self.tokenizer.decode([token]).encode("utf-8", errors="replace")
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> character table: printable Latin-1 bytes stand
    for themselves, the others (controls, space, a few more) for the characters from U+0100 on,
    in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


__all__ = ["MAX_TOP_LOGPROBS", "LogprobsError", "token_logprobs"]
