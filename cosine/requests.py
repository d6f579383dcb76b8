"""Turning a client's request fields into token ids, sampling parameters and stop rules.

Shared by the local engine's CLI and the pipeline's router, so both validate alike: exactly one
of ``prompt`` / ``messages``; ``messages`` is a JSON list of ``{"role", "content"}`` strings, run
through the target's chat template with the generation prompt.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from cosine.core.logprobs import MAX_TOP_LOGPROBS
from cosine.core.params import SamplingParams
from cosine.core.stopping import StopRules

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
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    parsed = _parse_messages(messages)
    encoded = tokenizer.apply_chat_template(parsed, add_generation_prompt=True)
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


def stop_rules(max_tokens: Any, limit: int, eos_ids: frozenset[int], stop: str | list | None = None) -> StopRules:
    try:
        max_tokens = int(max_tokens)
    except (TypeError, ValueError):
        raise RequestError(f"'max_tokens' must be an integer, got {max_tokens!r}", "max_tokens") from None
    if not 1 <= max_tokens <= limit:
        raise RequestError(f"'max_tokens' must be in [1, {limit}], got {max_tokens}", "max_tokens")
    return StopRules(max_tokens, eos_ids, parse_stop(stop))


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
