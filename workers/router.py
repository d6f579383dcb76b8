"""Router: validates client requests, tokenizes them, picks experts, opens round 0.

Reads ``requests`` (flat string fields from any Redis client) and ``cancel``. Writes the request
state and the first draft job to each chosen expert's queue, and acknowledges the entry, in one
Lua call. Bad input gets an ``error`` final entry on ``out:{id}`` and never stops the worker.
"""

from __future__ import annotations

import contextlib
import time

from cosine.workers.base import Entry, StageWorker, apply_update
from cosine.workers.convert import empty_candidate
from cosine.workers.models import load_tokenizer_and_limits

from cosine.bus import write_and_ack
from cosine.requests import RequestError, eos_token_ids, parse_stop, prompt_token_ids, sampling_params
from cosine.spec.routing import choose_experts
from cosine.state import FINISHED, RequestState, fail
from cosine.wire import DraftJob, Sampling, encode

MAX_ID_LENGTH = 200
KNOWN_FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "expert"}


class Router(StageWorker):
    role = "router"

    def input_streams(self) -> list[str]:
        return [self.keys.requests, self.keys.cancel]

    async def setup(self) -> None:
        self.tokenizer, self.context_limit, self.model_config = await self.off_loop(load_tokenizer_and_limits, self.config)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model_config)
        self.experts = sorted({d.expert for d in self.config.drafters})

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        for entry_id, fields in entries:
            if stream == self.keys.cancel:
                await self._cancel(entry_id, fields)
            else:
                await self._admit(entry_id, fields)

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        if stream == self.keys.requests:
            entry_id, raw = entry
            request_id = raw.get(b"id", entry_id).decode(errors="replace")
            with contextlib.suppress(RequestError):
                _check_id(request_id)
                await self._error_entry(request_id, reason)

    async def _admit(self, entry_id: bytes, raw: dict[bytes, bytes]) -> None:
        request_id = entry_id.decode()
        try:
            fields = _text_fields(raw)
            request_id = fields.get("id") or request_id
            _check_id(request_id)
            state = self._build_state(request_id, fields)
        except RequestError as error:
            await self._reject(entry_id, request_id, str(error))
            return
        job = DraftJob(
            state.request_id, 0, state.context, state.window, _sampling(state), state.experts, int(time.time() * 1000)
        )
        fields_out = state.to_fields()
        streams = [self.keys.draft(e) for e in state.experts]
        args = [entry_id, self.group, entry_id, len(fields_out)]
        for name, value in fields_out.items():
            args += [name, value]
        live = await self.live_drafter_experts()
        if not any(e in live for e in state.experts):
            # No drafter alive for these experts: start without drafts (window 0).
            streams = [self.keys.candidates]
            args.append(encode(empty_candidate(state))[b"m"])
        else:
            args.append(encode(job)[b"m"])
        args.append(state.request_id)
        keys = [self.keys.request(state.request_id), self.keys.requests, self.keys.rounds, *streams]
        outcome = (await self.redis.fcall("cosine_create_request", len(keys), *keys, *args)).decode()
        if outcome == "in_use":
            await self._error_entry(state.request_id + "", f"request id {state.request_id!r} is already in use", reused=True)
        self.log.info("request %s: %s (%d prompt tokens, experts %s)", state.request_id, outcome, len(state.prompt_ids), state.experts)

    def _build_state(self, request_id: str, fields: dict[str, str]) -> RequestState:
        unknown = set(fields) - KNOWN_FIELDS
        if unknown:
            raise RequestError(f"unknown request fields: {sorted(unknown)}")
        for name in ("prompt", "messages"):
            if len(fields.get(name, "")) > self.config.pipeline.max_prompt_chars:
                raise RequestError(f"'{name}' is longer than {self.config.pipeline.max_prompt_chars} characters")
        prompt_ids = prompt_token_ids(self.tokenizer, fields.get("prompt"), fields.get("messages"))
        max_tokens = _int_field(fields, "max_tokens", self.config.defaults.max_tokens)
        if not 1 <= max_tokens <= self.config.defaults.max_tokens_limit:
            raise RequestError(f"'max_tokens' must be in [1, {self.config.defaults.max_tokens_limit}], got {max_tokens}")
        if len(prompt_ids) + max_tokens > self.context_limit:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context limit ({self.context_limit})"
            )
        sampling = sampling_params(fields.get("temperature", 0), fields.get("top_p", 1), fields.get("seed", 0))
        pinned = fields.get("expert")
        if pinned is not None and pinned not in self.experts:
            raise RequestError(f"unknown expert {pinned!r}; valid experts: {', '.join(self.experts)}")
        text = fields.get("prompt") or fields.get("messages") or ""
        experts = choose_experts(text, pinned, self.config.router.default_experts, self.config.router.keywords, self.experts, self.config.router.max_experts)
        spec = self.config.speculation
        return RequestState(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=parse_stop(fields.get("stop")),
            eos_ids=tuple(sorted(self.eos_ids)),
            experts=experts,
            window=spec.window,
            created_ms=int(time.time() * 1000),
        )

    async def _reject(self, entry_id: bytes, request_id: str, reason: str) -> None:
        self.log.info("request %s rejected: %s", request_id, reason)
        await self._error_entry(request_id, reason, ack=entry_id)

    async def _error_entry(self, request_id: str, reason: str, ack: bytes | None = None, reused: bool = False) -> None:
        entry = {"type": "final", "finish_reason": "error", "error": reason, "text": "", "token_ids": "[]",
                 "prompt_tokens": "0", "generated_tokens": "0", "rounds": "0", "draft_tokens": "0", "accepted_tokens": "0"}
        outputs = [(self.keys.out(request_id), entry)]
        await write_and_ack(self.redis, outputs, self.keys.requests, self.group, [ack] if ack else [])
        if not reused:
            await self.redis.expire(self.keys.out(request_id), self.config.pipeline.output_ttl_s)

    async def _cancel(self, entry_id: bytes, raw: dict[bytes, bytes]) -> None:
        request_id = raw.get(b"id", b"").decode(errors="replace")
        key = self.keys.request(request_id)
        fields = await self.redis.hgetall(key) if request_id else {}
        if fields and fields.get(b"status", b"").decode() != FINISHED:
            state = RequestState.from_fields(fields)
            update = fail(state, self.tokenizer, "cancelled by client", "cancelled")
            await apply_update(self.redis, self.keys, state, update, None, self.config.pipeline.output_ttl_s)
            self.log.info("request %s cancelled", request_id)
        await self.redis.xack(self.keys.cancel, self.group, entry_id)


def _text_fields(raw: dict[bytes, bytes]) -> dict[str, str]:
    try:
        return {k.decode(): v.decode() for k, v in raw.items()}
    except UnicodeDecodeError:
        raise RequestError("request fields must be UTF-8 text") from None


def _check_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_ID_LENGTH or any(c.isspace() or c in "{}" for c in request_id):
        raise RequestError(f"'id' must be 1-{MAX_ID_LENGTH} characters without spaces or braces")


def _int_field(fields: dict[str, str], name: str, default: int) -> int:
    if name not in fields:
        return default
    try:
        return int(fields[name])
    except ValueError:
        raise RequestError(f"'{name}' must be an integer, got {fields[name]!r}") from None


def _sampling(state: RequestState) -> Sampling:
    return Sampling(state.sampling.temperature, state.sampling.top_p, state.sampling.seed)

