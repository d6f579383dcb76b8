"""The OpenAI API's shapes, translated to and from the CoSine protocol (no I/O).

Requests: a ``/v1/chat/completions`` or ``/v1/completions`` body becomes the flat fields of a
``requests`` entry (``chat_fields``, ``completion_fields``), or an ``ApiError`` naming the
parameter. Responses: a request's final entry becomes a completion object, its ``tokens``
entries become stream chunks, and an ``error`` final becomes the OpenAI error body with the
HTTP status its ``error_code`` maps to. The router checks the fields again (ranges, the
context limit, the chat template's roles): what it refuses comes back as the same 400.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from cosine.core.logprobs import MAX_TOP_LOGPROBS
from cosine.core.protocol import MAX_WINDOW_LIMIT, ClientRequest, Final, RequestError, RequestLimits

# Parameters we do not implement, accepted at their neutral values only.
NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "n": (1, None),
    "best_of": (1, None),
    "echo": (False, None),
    "logit_bias": (None,),
    "suffix": (None, ""),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "functions": (None,),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "metadata": (None,),
    "service_tier": (None, "auto", "default"),
}
SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "user", "stream", "stream_options")
EXTENSIONS = ("max_window",)  # CoSine's own request fields (extra_body in the openai client)
CHAT_PARAMS = {"model", "messages", *SAMPLING, *NEUTRAL, *EXTENSIONS, "logprobs", "top_logprobs"}
COMPLETION_PARAMS = {"model", "prompt", *SAMPLING, *NEUTRAL, *EXTENSIONS, "logprobs"}
ROLES = ("system", "developer", "user", "assistant")
# A CoSine field an `invalid` final names -> the OpenAI parameter (chat, completion).
PARAM_NAMES = {"messages": "messages", "prompt": "prompt", "max_tokens": "max_tokens", "temperature": "temperature",
               "top_p": "top_p", "seed": "seed", "stop": "stop", "logprobs": "logprobs", "max_window": "max_window"}
ERROR_STATUS = {"invalid": 400, "busy": 503, "target_gone": 503, "deadline": 504, "internal": 500, "cancelled": 499}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
              504: "timeout", 500: "server_error", 499: "cancelled"}


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP ``status``, a message, the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPE.get(self.status, "server_error"), "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the gateway submits and how it answers."""

    fields: dict[str, str]
    model: str
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    logprobs: int = -1  # >= 0: answer with log-probabilities and this many alternatives per token


def _same(value: Any, neutral: Any) -> bool:
    """``value == neutral`` without booleans standing for numbers (``n: true`` is not ``n: 1``)."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    return body


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise _invalid(f"'{name}' must be a number in [{low:g}, {high:g}], got {json.dumps(value)[:40]}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"'{name}' must be an integer in [{low}, {high}], got {json.dumps(value)[:40]}", name)
    return value


def _common(body: dict, known: set[str], served: tuple[str, ...]) -> tuple[dict[str, str], str, bool, bool]:
    unknown = sorted(set(body) - known)
    if unknown:
        raise _invalid(f"unsupported parameter: '{unknown[0]}'", unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and not any(_same(body[name], value) for value in neutral):
            raise _invalid(f"'{name}' is not supported (only {', '.join(json.dumps(v) for v in neutral)})", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' is required", "model")
    if served and model not in served:
        raise ApiError(404, f"the model '{model[:100]}' does not exist; served: {', '.join(served)}", "model", "model_not_found")
    fields: dict[str, str] = {}
    tokens = _integer(body, "max_completion_tokens", 1, 2**31) or _integer(body, "max_tokens", 1, 2**31)
    if tokens is not None:
        fields["max_tokens"] = str(tokens)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = _number(body, name, low, high)
        if value is not None:
            fields[name] = repr(value)
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None:
        fields["seed"] = str(seed % 2**63)  # the pipeline seeds with [0, 2**63)
    max_window = _integer(body, "max_window", 0, MAX_WINDOW_LIMIT)  # 0: no speculation for this request
    if max_window is not None:
        fields["max_window"] = str(max_window)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            fields["stop"] = json.dumps([stop])
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            if stop:
                fields["stop"] = json.dumps(stop)
        else:
            raise _invalid("'stop' must be a string or a list of strings", "stop")
    if "user" in body and not isinstance(body["user"], str):
        raise _invalid("'user' must be a string", "user")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _invalid("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise _invalid("'stream_options' supports only 'include_usage'", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _invalid("'stream_options.include_usage' must be a boolean", "stream_options")
    return fields, model, bool(stream), include_usage


def _content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise _invalid(f"messages[{index}].content must be a string or a list of text parts", "messages")


def chat_fields(body: Any, served: tuple[str, ...] = ()) -> ParsedRequest:
    """A ``/v1/chat/completions`` body -> the request's fields."""
    body = _object(body)
    fields, model, stream, include_usage = _common(body, CHAT_PARAMS, served)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _invalid("'logprobs' must be a boolean", "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise _invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (top or 0) if wanted else -1
    if logprobs >= 0:
        fields["logprobs"] = str(logprobs)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"messages[{index}] must be an object with a 'role'", "messages")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise _invalid(f"messages[{index}]: unsupported key '{sorted(extra)[0]}'", "messages")
        role = message["role"]
        if role not in ROLES:
            raise _invalid(f"messages[{index}].role must be one of {', '.join(ROLES)}", "messages")
        plain.append({"role": "system" if role == "developer" else role, "content": _content(message.get("content"), index)})
    fields["messages"] = json.dumps(plain)
    return ParsedRequest(fields, model, stream, include_usage, logprobs=logprobs)


def completion_fields(body: Any, served: tuple[str, ...] = ()) -> ParsedRequest:
    """A ``/v1/completions`` body -> the request's fields."""
    body = _object(body)
    fields, model, stream, include_usage = _common(body, COMPLETION_PARAMS, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _invalid("'prompt' must be a string (one prompt per request)", "prompt")
    try:
        prompt.encode()
    except UnicodeEncodeError:
        raise _invalid("'prompt' is not valid Unicode text (a lone surrogate)", "prompt") from None
    fields["prompt"] = prompt
    logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    if logprobs is not None:
        fields["logprobs"] = str(logprobs)
    return ParsedRequest(fields, model, stream, include_usage, logprobs=-1 if logprobs is None else logprobs)


def checked(parsed: ParsedRequest, kind: str, limits: RequestLimits) -> ParsedRequest:
    """The request's fields checked by the pipeline's own parser (``ClientRequest``), so a value
    the router would refuse gets its 400 here, with the router's message."""
    try:
        ClientRequest.from_fields(parsed.fields, limits)
    except RequestError as error:
        raise ApiError(400, str(error), _param(error.param, kind), error.code) from None
    return parsed


def _param(name: str, kind: str) -> str | None:
    """The OpenAI parameter a CoSine request field stands for."""
    param = PARAM_NAMES.get(name, name or None)
    return "prompt" if kind == "completion" and param == "messages" else param


def failed(final: Final) -> bool:
    return final.finish_reason in ("error", "cancelled")


def error_from_final(final: Final, kind: str) -> ApiError:
    """The HTTP error of an ``error`` (or ``cancelled``) final."""
    code = final.error_code or ("cancelled" if final.finish_reason == "cancelled" else "internal")
    status = ERROR_STATUS.get(code, 500)
    return ApiError(status, final.error or code, _param(final.error_param, kind), code)


def usage(final: Final) -> dict[str, int]:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generated_tokens, "total_tokens": final.prompt_tokens + final.generated_tokens}


def speculation(final: Final) -> dict[str, Any]:
    """The documented extra field: what speculation did for this request."""
    rounds = final.rounds
    return {
        "num_draft_tokens": final.draft_tokens,
        "num_accepted_tokens": final.accepted_tokens,
        "num_verification_rounds": rounds,
        "mean_acceptance_length": round(final.generated_tokens / rounds, 4) if rounds else 0.0,
        "drafters": {name: {"num_draft_tokens": d["drafted"], "num_accepted_tokens": d["accepted"]} for name, d in final.drafters.items()},
    }


def finish_reason(final: Final) -> str:
    return final.finish_reason or "stop"


def _plain(token: dict) -> dict:
    return {"token": token["token"], "logprob": token["logprob"], "bytes": token["bytes"]}


def chat_logprobs(tokens: list[dict]) -> dict:
    """``choices[].logprobs`` of a chat response or chunk."""
    return {"content": [{**_plain(t), "top_logprobs": [_plain(a) for a in t["top_logprobs"]]} for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[dict], offset: int = 0) -> dict:
    """``choices[].logprobs`` of a legacy completion or chunk: parallel lists, the alternatives
    as token -> logprob maps holding the chosen token too; ``offset``: the text offset of the
    first token (the characters of the tokens before it)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token["token"])
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [{**{a["token"]: a["logprob"] for a in t["top_logprobs"]}, t["token"]: t["logprob"]} for t in tokens],
        "text_offset": offsets,
    }


def choice_logprobs(kind: str, tokens: list[dict] | None, offset: int = 0) -> dict | None:
    if tokens is None:
        return None
    return chat_logprobs(tokens) if kind == "chat" else completion_logprobs(tokens, offset)


def completion_object(kind: str, request_id: str, created: int, model: str, fingerprint: str, final: Final,
                      logprobs: list[dict] | None = None) -> dict:
    """The non-streaming response: ``chat.completion`` or ``text_completion``; ``logprobs``: the
    log-probability entries of the whole completion, when asked for."""
    text = final.text
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": choice_logprobs(kind, logprobs),
                  "finish_reason": finish_reason(final)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": choice_logprobs(kind, logprobs), "finish_reason": finish_reason(final)}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint,
            "choices": [choice], "usage": usage(final), "cosine": speculation(final)}


def chunk(kind: str, request_id: str, created: int, model: str, fingerprint: str, *, text: str | None = None, role: bool = False,
          finish: str | None = None, include_usage: bool = False, logprobs: list[dict] | None = None, offset: int = 0) -> dict:
    """One streaming chunk: ``chat.completion.chunk`` (a delta) or ``text_completion``;
    ``logprobs``: the log-probability entries of the chunk's tokens (``offset``: as in
    ``completion_logprobs``)."""
    if kind == "chat":
        delta: dict[str, str] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": choice_logprobs(kind, logprobs), "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": choice_logprobs(kind, logprobs, offset), "finish_reason": finish}
        obj = "text_completion"
    out = {"id": request_id, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint, "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


class ContentChunks:
    """``chunk(text=...)`` events of one response, made by pasting the text's JSON between two
    parts made once (a stream sends one per output entry)."""

    def __init__(self, kind: str, request_id: str, created: int, model: str, fingerprint: str, include_usage: bool) -> None:
        marker = "\u0000marker\u0000"
        whole = json.dumps(chunk(kind, request_id, created, model, fingerprint, text=marker, include_usage=include_usage), separators=(",", ":"))
        head, _, tail = whole.partition(json.dumps(marker))
        self.head, self.tail = ("data: " + head).encode(), (tail + "\n\n").encode()

    def event(self, text: str) -> bytes:
        return self.head + json.dumps(text).encode() + self.tail


def usage_chunk(kind: str, request_id: str, created: int, model: str, fingerprint: str, final: Final) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage and the
    speculation statistics."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint,
            "choices": [], "usage": usage(final), "cosine": speculation(final)}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()
