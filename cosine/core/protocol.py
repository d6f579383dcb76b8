"""The client protocol's output entries (``out:{id}``): tokens and final, typed, with the one
place their Redis fields are written (``to_fields``) and read (``from_fields``). Flat string
fields, so any Redis client reads them. Pure: the speculative core builds its entries here, the
local engine's results are ``Final`` entries, and every reader (client, gateway, CLI, demo) parses
with ``from_fields``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosine.core.rounds import RequestState

COUNTS = ("prompt_tokens", "generated_tokens", "rounds", "draft_tokens", "accepted_tokens")


@dataclass(slots=True)
class Tokens:
    """Text and token ids a round emitted (``logprobs``: per token, when the request asked)."""

    text: str
    token_ids: list[int]
    logprobs: list | None = None

    def to_fields(self) -> dict[str, str]:
        entry = {"type": "tokens", "text": self.text, "token_ids": json.dumps(list(self.token_ids))}
        if self.logprobs is not None:
            entry["logprobs"] = json.dumps(self.logprobs, ensure_ascii=False)
        return entry

    @classmethod
    def from_fields(cls, entry: Mapping[str, str]) -> Tokens:
        logprobs = entry.get("logprobs")
        return cls(entry.get("text", ""), json.loads(entry.get("token_ids") or "[]"), json.loads(logprobs) if logprobs else None)


@dataclass(slots=True)
class Final:
    """A request's last entry: why it ended, its whole text and tokens, and what speculation did
    (``drafters``: name -> {"drafted", "accepted"})."""

    finish_reason: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafters: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str = ""
    error_code: str = ""
    error_param: str = ""

    @classmethod
    def of(cls, state: RequestState, text: str, finish_reason: str, error: str = "", error_code: str = "") -> Final:
        """The final entry of a request in ``state`` (its output and counts so far)."""
        return cls(
            finish_reason, text, list(state.output_ids), len(state.prompt_ids), len(state.output_ids), state.rounds,
            state.draft_tokens, state.accepted_tokens, {name: {"drafted": d, "accepted": a} for name, (d, a) in state.drafters.items()},
            error, (error_code or "internal") if error else "",
        )

    def to_fields(self) -> dict[str, str]:
        entry = {"type": "final", "finish_reason": self.finish_reason, "text": self.text, "token_ids": json.dumps(list(self.token_ids))}
        entry.update((name, str(getattr(self, name))) for name in COUNTS)
        entry["drafters"] = json.dumps(self.drafters)
        for name in ("error", "error_code", "error_param"):
            if getattr(self, name):
                entry[name] = getattr(self, name)
        return entry

    @classmethod
    def from_fields(cls, entry: Mapping[str, str]) -> Final:
        """A final entry's fields (any missing count is 0); ValueError if one is malformed."""
        try:
            return cls(
                entry.get("finish_reason", ""), entry.get("text", ""), [int(t) for t in json.loads(entry.get("token_ids") or "[]")],
                *(int(entry.get(name) or 0) for name in COUNTS),
                {str(n): {"drafted": int(c["drafted"]), "accepted": int(c["accepted"])} for n, c in json.loads(entry.get("drafters") or "{}").items()},
                entry.get("error", ""), entry.get("error_code", ""), entry.get("error_param", ""),
            )
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as error:
            raise ValueError(f"malformed final entry: {error}") from None

    def to_json(self) -> dict[str, Any]:
        """The entry as typed JSON (numbers as numbers, lists as lists): ``cosine generate --json``."""
        return {f.name: getattr(self, f.name) for f in fields(Final) if getattr(self, f.name) != "" or not f.name.startswith("error")}


def tokens_entry(text: str, token_ids: list[int] | tuple[int, ...], logprobs: list | None = None) -> dict[str, str]:
    return Tokens(text, list(token_ids), logprobs).to_fields()


def final_entry(state: RequestState, text: str, finish_reason: str, error: str = "", error_code: str = "") -> dict[str, str]:
    return Final.of(state, text, finish_reason, error, error_code).to_fields()


def refusal_entry(error: str, error_code: str, error_param: str = "", finish_reason: str = "error") -> dict[str, str]:
    """The one final entry of a request refused (or cancelled) before it started."""
    return Final(finish_reason, error=error, error_code=error_code, error_param=error_param).to_fields()


def parse_entry(entry: Mapping[str, str]) -> Tokens | Final:
    """An output entry's fields, typed by its ``type``."""
    kind = entry.get("type")
    if kind == "tokens":
        return Tokens.from_fields(entry)
    if kind == "final":
        return Final.from_fields(entry)
    raise ValueError(f"unknown output entry type {kind!r}")
