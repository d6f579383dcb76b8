"""The client protocol, typed: the request a client writes to ``requests`` (``ClientRequest``,
parsed and validated once here for the router, the CLI and the gateway) and the output entries
the server writes to ``out:{id}`` (``Tokens``, ``Final``), each with the one place its Redis
fields are written (``to_fields``) and read (``from_fields``). Flat string fields, so any Redis
client reads and writes them. Pure: the speculative core builds its entries here, the local
engine's results are ``Final`` entries, and every reader (client, gateway, CLI, demo) parses with
``from_fields``.

Prompts: exactly one of ``prompt`` / ``messages``; ``messages`` is a JSON list of
``{"role", "content"}`` strings, run through the target's chat template with the generation prompt.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from cosine.core.logprobs import MAX_TOP_LOGPROBS
from cosine.core.params import SamplingParams
from cosine.core.stopping import StopRules

if TYPE_CHECKING:
    from cosine.core.rounds import RequestState

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128
MAX_MESSAGES = 512


class RequestError(ValueError):
    """The request is invalid; the message is meant for the client.

    ``param`` names the offending field (``error_param`` in the final entry); ``code`` is the
    machine-readable ``error_code`` clients branch on.
    """

    def __init__(self, message: str, param: str = "", code: str = "invalid") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def prompt_token_ids(tokenizer, prompt: str | None = None, messages: str | list | None = None) -> list[int]:
    if (prompt is None) == (messages is None):
        raise RequestError("give exactly one of 'prompt' and 'messages'", "prompt" if prompt is not None else "messages")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string", "prompt")
        return _encode(tokenizer, prompt, None)
    return _encode(tokenizer, None, _parse_messages(messages))


def _encode(tokenizer, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
    """The token ids of a checked prompt, or of checked messages through the chat template."""
    if prompt is not None:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(t) for t in ids]


def _parse_messages(messages: str | list) -> list[dict[str, str]]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise RequestError(f"'messages' is not valid JSON: {error}", "messages") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty JSON list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES}", "messages")
    for message in messages:
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise RequestError("each message must be an object with exactly 'role' and 'content'", "messages")
        if not all(isinstance(message[k], str) for k in ("role", "content")):
            raise RequestError("message 'role' and 'content' must be strings", "messages")
        if message["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"unknown message role {message['role']!r}", "messages")
    return messages


def eos_token_ids(tokenizer, model_config: Any = None) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return frozenset(ids)


def parse_stop(stop: str | list | None) -> tuple[str, ...]:
    if stop is None or stop == "":
        return ()
    if isinstance(stop, str):
        try:
            stop = json.loads(stop)
        except json.JSONDecodeError:
            stop = [stop]  # a plain string is one stop string (handy from redis-cli)
    if isinstance(stop, str):
        stop = [stop]
    # Bounded: the stop check runs on the coordinator's event loop every round.
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise RequestError(f"'stop' must be a JSON list of at most {MAX_STOP_STRINGS} strings of 1-{MAX_STOP_CHARS} characters", "stop")
    return tuple(stop)


def sampling_params(temperature: Any = 0.0, top_p: Any = 1.0, seed: Any = None) -> SamplingParams:
    """Sampling parameters; without a seed a random one is drawn (and recorded by the caller),
    so identical unseeded requests get independent samples yet each can be replayed."""
    values = {"temperature": temperature, "top_p": top_p, "seed": secrets.randbits(62) if seed is None else seed}
    parsed = {}
    for name, value in values.items():
        try:
            parsed[name] = int(value) if name == "seed" else float(value)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"'{name}' must be a number, got {value!r}", name) from None
        if parsed[name] != parsed[name]:
            raise RequestError(f"'{name}' must be a number, got {value!r}", name)
    try:
        return SamplingParams(**parsed)
    except ValueError as error:
        param = next((n for n in ("temperature", "top_p", "seed") if n in str(error)), "")
        raise RequestError(str(error), param) from None


MAX_WINDOW_LIMIT = 64  # a request's max_window beyond this caps nothing (the configured max_window is lower)


def max_window_cap(value: Any) -> int:
    """The ``max_window`` field: the most tokens a round of this request may draft (0: none, the
    target alone decodes it); absent (None) is -1, the configured windows."""
    return -1 if value is None else _bounded_int(value, "max_window", 0, MAX_WINDOW_LIMIT)


def logprobs_count(value: Any) -> int:
    """The ``logprobs`` field: how many most likely alternatives to report with each token's
    log-probability (0: the token's own only); absent (None) is -1, no log-probabilities."""
    return -1 if value is None else _bounded_int(value, "logprobs", 0, MAX_TOP_LOGPROBS)


def _bounded_int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"'{name}' must be an integer in [{low}, {high}], got {str(value)[:40]!r}", name) from None
    if not low <= number <= high:
        raise RequestError(f"'{name}' must be an integer in [{low}, {high}], got {number}", name)
    return number


MAX_ID_LENGTH = 200


def request_id_of(raw: Mapping[bytes, bytes], entry_id: bytes) -> str:
    """The id a client will read its answer under: its ``id`` field when that is a usable id,
    else the entry ID that ``XADD`` returned."""
    fallback = entry_id.decode()
    value = raw.get(b"id")
    if value is None:
        return fallback
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return fallback
    if not text or len(text) > MAX_ID_LENGTH or any(c.isspace() or c in "{}" for c in text):
        return fallback
    return text


def text_fields(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    """A request entry's fields as text (RequestError naming a field that is not UTF-8)."""
    text = {}
    for key, value in raw.items():
        try:
            text[key.decode()] = value.decode()
        except UnicodeDecodeError:
            raise RequestError("request fields must be UTF-8 text", key.decode(errors="replace")) from None
    return text


REQUEST_FIELDS = ("id", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "expert", "deadline_s", "logprobs", "max_window")
MAX_DEADLINE_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The server's bounds and defaults for a request's fields."""

    max_tokens: int = 256  # the default
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 200_000
    deadline_s: float = 600.0  # the default

    @classmethod
    def of(cls, config) -> RequestLimits:
        """A ``Config``'s (its defaults and pipeline sections)."""
        d, p = config.defaults, config.pipeline
        return cls(d.max_tokens, d.max_tokens_limit, p.max_prompt_chars, p.deadline_s)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """A request entry's fields, parsed and validated (``from_fields``; absent fields take the
    limits' defaults). ``messages`` is the parsed list; ``seed`` None means the server draws one
    (``sampling``) and records it in the request state. Any Redis client writes the fields (the
    Python client: ``cosine.client.request_fields``)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    expert: str | None = None
    deadline_s: float = 600.0
    logprobs: int = -1  # >= 0: log-probabilities with this many alternatives per token
    max_window: int = -1  # >= 0: the request's cap on its speculation window (0: no drafting)
    id: str | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, str], limits: RequestLimits = RequestLimits()) -> ClientRequest:
        """The request in a client's fields, or RequestError naming the first bad field."""
        unknown = set(fields) - set(REQUEST_FIELDS)
        if unknown:
            raise RequestError(f"unknown request fields: {sorted(unknown)}", sorted(unknown)[0])
        for name in ("prompt", "messages"):
            if len(fields.get(name, "")) > limits.max_prompt_chars:
                raise RequestError(f"'{name}' is longer than {limits.max_prompt_chars} characters", name)
        prompt, messages = fields.get("prompt"), fields.get("messages")
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of 'prompt' and 'messages'", "prompt" if prompt is not None else "messages")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise RequestError("'prompt' must be a non-empty string", "prompt")
        parsed = _parse_messages(messages) if messages is not None else None
        max_tokens = _int_field(fields, "max_tokens", limits.max_tokens)
        if not 1 <= max_tokens <= limits.max_tokens_limit:
            raise RequestError(f"'max_tokens' must be in [1, {limits.max_tokens_limit}], got {max_tokens}", "max_tokens")
        sampling = sampling_params(fields.get("temperature", 0), fields.get("top_p", 1), fields.get("seed", 0))
        return cls(
            prompt=prompt,
            messages=parsed,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed if "seed" in fields else None,
            stop=parse_stop(fields.get("stop")),
            expert=fields.get("expert"),
            deadline_s=_deadline_field(fields, limits.deadline_s),
            logprobs=logprobs_count(fields.get("logprobs")),
            max_window=max_window_cap(fields.get("max_window")),
            id=fields.get("id"),
        )

    @property
    def sampling(self) -> SamplingParams:
        """The sampling parameters, a fresh random seed when the request gave none: identical
        unseeded requests get independent samples yet each can be replayed."""
        return SamplingParams(self.temperature, self.top_p, secrets.randbits(62) if self.seed is None else self.seed)

    def token_ids(self, tokenizer) -> list[int]:
        """The prompt's token ids (``messages`` through the chat template); checked already."""
        return _encode(tokenizer, self.prompt, self.messages)

    def stop_rules(self, eos_ids: frozenset[int]) -> StopRules:
        return StopRules(self.max_tokens, eos_ids, self.stop)


def _int_field(fields: Mapping[str, str], name: str, default: int) -> int:
    if fields.get(name) is None:
        return default
    try:
        return int(fields[name])
    except (TypeError, ValueError):
        raise RequestError(f"'{name}' must be an integer, got {str(fields[name])[:40]!r}", name) from None


def _deadline_field(fields: Mapping[str, str], default: float) -> float:
    if fields.get("deadline_s") is None:
        return default
    try:
        value = float(fields["deadline_s"])
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= MAX_DEADLINE_S:  # also refuses NaN
        raise RequestError(f"'deadline_s' must be a number of seconds in (0, {MAX_DEADLINE_S}]", "deadline_s")
    return value


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
