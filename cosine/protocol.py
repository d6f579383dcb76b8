"""The client protocol's output entries (``out:{id}``): tokens, final, refusal. Flat string
fields, so any Redis client reads them; the one place they are built (pure: the speculative core
uses it, and so does every writer).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosine.core.rounds import RequestState


def tokens_entry(text: str, token_ids: list[int] | tuple[int, ...], logprobs: list | None = None) -> dict[str, str]:
    """Text and token ids a round emitted (``logprobs``: per token, when the request asked)."""
    entry = {"type": "tokens", "text": text, "token_ids": json.dumps(list(token_ids))}
    if logprobs is not None:
        entry["logprobs"] = json.dumps(logprobs, ensure_ascii=False)
    return entry


def final_entry(state: RequestState, text: str, finish_reason: str, error: str = "", error_code: str = "") -> dict[str, str]:
    entry = {
        "type": "final",
        "finish_reason": finish_reason,
        "text": text,
        "token_ids": json.dumps(state.output_ids),
        "prompt_tokens": str(len(state.prompt_ids)),
        "generated_tokens": str(len(state.output_ids)),
        "rounds": str(state.rounds),
        "draft_tokens": str(state.draft_tokens),
        "accepted_tokens": str(state.accepted_tokens),
        "drafters": json.dumps({name: {"drafted": d, "accepted": a} for name, (d, a) in state.drafters.items()}),
    }
    if error:
        entry["error"] = error
        entry["error_code"] = error_code or "internal"
    return entry


def refusal_entry(error: str, error_code: str, error_param: str = "") -> dict[str, str]:
    """The one final entry of a request refused before it started."""
    entry = {"type": "final", "finish_reason": "error", "text": "", "token_ids": "[]", "prompt_tokens": "0",
             "generated_tokens": "0", "rounds": "0", "draft_tokens": "0", "accepted_tokens": "0", "drafters": "{}",
             "error": error, "error_code": error_code}
    if error_param:
        entry["error_param"] = error_param
    return entry
