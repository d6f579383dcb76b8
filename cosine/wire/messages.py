"""The internal message types between stages, and their encode/decode.

Internal messages travel as msgpack in one stream field (``m``) with a schema version; never
pickle. Client-facing streams (``requests``, ``cancel``, ``out:{id}``) use flat string fields so
any Redis client can speak them. An unknown version or a malformed message raises
``WireError``; the worker dead-letters the entry and carries on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from cosine.core.params import SamplingParams

SCHEMA_VERSION = 1
PAYLOAD_FIELD = b"m"
MAX_PAYLOAD_BYTES = 64 << 20


class WireError(ValueError):
    """A message that cannot be decoded: wrong type, version or shape."""


# ---- internal messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DraftJob:
    """Router/coordinator -> drafters of one expert: draft round ``round`` of a request."""

    KIND: ClassVar[str] = "draft_job"
    request_id: str
    round: int
    context: list[int]  # committed tokens (prompt + output so far) from position context_start on
    window: int
    sampling: SamplingParams
    experts: list[str]  # every expert cooperating this round (fusion waits for all)
    issued_ms: int = 0
    # The target's hidden states (fp16 rows) at positions features_start.. that the last round
    # committed, for feature drafters: a drafter holding rows 0..features_start-1 for the request
    # appends them; one holding fewer reads the request's features key (``Keys.features``).
    features: bytes = b""
    features_start: int = 0
    domain: str = ""  # the request's first-choice expert (per-domain suffix datastores key on it)
    # Step mode (speculation.mode = "step"): draft one token after context + prefix (the fused
    # tokens of steps < step); fusion fuses each step and sends the next step's jobs.
    step_mode: bool = False
    step: int = 0
    prefix: list[int] = field(default_factory=list)
    # > 0: ``context`` holds the committed tokens from here on; the ones before are referenced
    # by their blake2b digest (``cosine.wire.context``): the worker's own copy, or the request's hash.
    context_start: int = 0
    context_digest: bytes = b""

    @property
    def context_len(self) -> int:
        return self.context_start + len(self.context)


@dataclass(frozen=True, slots=True)
class Draft:
    """Drafter -> fusion: one drafter's chain for one round.

    draft_probs: per token when sampled, else empty: the distribution it was drawn from as a
    sparse row (``cosine.wire.convert.probs_to_bytes``: vocabulary size, indices, probabilities).
    draft_ms: the drafter's compute time (``propose``) for the batch of jobs this draft came
    from, for measurements of where a round's time goes.
    """

    KIND: ClassVar[str] = "draft"
    request_id: str
    round: int
    expert: str
    drafter: str
    rank: int
    tokens: list[int]
    confidences: list[float]
    draft_probs: list[bytes] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    context_len: int = 0
    draft_ms: float = 0.0  # the drafter's compute for the batch of jobs this draft came from
    # Step mode: this draft is step ``step`` (one token after the job's prefix) of a round whose
    # window is ``window``; the job's fields fusion needs to send the next step.
    step_mode: bool = False
    step: int = 0
    window: int = 0
    prefix: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    domain: str = ""
    instance: str = ""  # the drafter instance that drafted it (its next round prefers it)


@dataclass(frozen=True, slots=True)
class Candidate:
    """Fusion -> coordinator: the fused token tree of one round."""

    KIND: ClassVar[str] = "candidate"
    request_id: str
    round: int
    tokens: list[int]
    parents: list[int]
    confidences: list[float]
    sources: list[list[str]]
    draws: list[list[int]]  # [node, probs_row or -1]
    draft_probs: list[bytes] = field(default_factory=list)
    homes: list = field(default_factory=list)  # [expert, drafter instance] that drafted this round


@dataclass(frozen=True, slots=True)
class VerifyItem:
    request_id: str
    round: int
    context: list[int]
    tree: Candidate
    sampling: SamplingParams
    fingerprint: str
    features_from: int = -1  # >= 0: return the target's hidden states of positions from here on
    # > 0: feed at most this many uncached context tokens now (chunked prefill); when more are
    # left, the result is a partial one (``VerifiedItem.prefilled``) and the round comes again.
    prefill_chunk: int = 0
    # As DraftJob's: ``context`` from context_start on, the tokens before it by digest.
    context_start: int = 0
    context_digest: bytes = b""
    # >= 0: return each emitted token's log-probability and this many most likely alternatives.
    logprobs: int = -1
    # A round without drafts (window 0) may decode up to this many tokens in this one job
    # (multi-step), stopping after any of ``stop_ids`` (the request's end-of-sequence tokens).
    steps: int = 1
    stop_ids: list[int] = field(default_factory=list)

    @property
    def context_len(self) -> int:
        return self.context_start + len(self.context)


@dataclass(frozen=True, slots=True)
class VerifyBatch:
    """Coordinator -> verifiers: requests to verify in one forward pass."""

    KIND: ClassVar[str] = "verify_batch"
    batch_id: str
    items: list[VerifyItem]
    # The coordinator instance that formed it: the result goes to its own verified stream
    # (``Keys.verified_at``) while that exists, else to the shared one ("": the shared one).
    reply_to: str = ""


@dataclass(frozen=True, slots=True)
class VerifiedItem:
    request_id: str
    round: int
    accepted_tokens: list[int]
    next_token: int
    draft_tokens: int
    error: str = ""
    error_code: str = ""
    features: bytes = b""  # fp16 rows, positions features_start .. L - 1 + len(accepted_tokens)
    features_start: int = 0
    # Per drafter that proposed nodes of the tree: [name, drafted, accepted, confidence sum].
    drafters: list = field(default_factory=list)
    # > 0: a chunk of the prefill, not a round: the verifier holds the context's first
    # ``prefilled`` positions; the round is to be verified again (no tokens here).
    prefilled: int = 0
    # When asked (``VerifyItem.logprobs``): per emitted token (accepted, then next),
    # [logprob, [top ids], [top logprobs]] under the target (``cosine.core.logprobs``).
    logprobs: list = field(default_factory=list)
    # A multi-step round (``VerifyItem.steps`` > 1): the tokens the target decoded after
    # ``next_token``, in order (the round emits accepted, next, then these).
    decoded: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VerifiedBatch:
    """Verifier -> coordinator: results of one verification batch."""

    KIND: ClassVar[str] = "verified_batch"
    batch_id: str
    verifier: str
    items: list[VerifiedItem]
    batch_size: int
    forward_ms: float
    fingerprint: str = ""


MESSAGE_TYPES = {cls.KIND: cls for cls in (DraftJob, Draft, Candidate, VerifyBatch, VerifiedBatch)}

Message = TypeVar("Message")


def encode(message: Any) -> dict[bytes, bytes]:
    """A stream entry's fields for an internal message."""
    body = {"v": SCHEMA_VERSION, "kind": message.KIND, "body": _to_plain(message)}
    return {PAYLOAD_FIELD: msgpack.packb(body, use_bin_type=True)}


def decode(fields: dict[bytes, bytes], expected: type[Message] | None = None) -> Message:
    """The internal message in a stream entry; ``WireError`` when it is not a valid one."""
    payload = fields.get(PAYLOAD_FIELD)
    if payload is None:
        raise WireError("entry has no payload field")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        envelope = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise WireError(f"payload is not msgpack: {error}") from None
    if not isinstance(envelope, dict) or envelope.get("v") != SCHEMA_VERSION:
        version = envelope.get("v") if isinstance(envelope, dict) else None
        raise WireError(f"unknown schema version {version!r} (this worker speaks {SCHEMA_VERSION})")
    cls = MESSAGE_TYPES.get(envelope.get("kind"))
    if cls is None or (expected is not None and cls is not expected):
        raise WireError(f"unexpected message kind {envelope.get('kind')!r}")
    return _from_plain(cls, envelope.get("body"))


def rounds_in(fields: dict[bytes, bytes]) -> list[tuple[str, int]]:
    """The (request id, round) pairs an entry names, read as leniently as can be (any schema
    version, any size): for an entry that cannot be decoded or handled, so the rounds it
    carried can be ended or redone instead of stranded. Empty where nothing can be read."""
    payload = fields.get(PAYLOAD_FIELD)
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False).get("body")
    except Exception:  # not msgpack, not a map, no payload: nothing to read
        return []
    items = body.get("items") if isinstance(body, dict) else None
    rows = items if isinstance(items, list) else [body]
    return [(row["request_id"], row["round"]) for row in rows
            if isinstance(row, dict) and isinstance(row.get("request_id"), str) and type(row.get("round")) is int]


_PLAIN = (int, float, str, bytes, bool, type(None))


def _to_plain(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        # Token lists are most of a message: copied whole when they hold only plain values.
        if all(type(v) in _PLAIN for v in value):
            return value
        return [_to_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


_ITEM_TYPES = {VerifyBatch: VerifyItem, VerifiedBatch: VerifiedItem}


def _from_plain(cls: type, body: Any) -> Any:
    if not isinstance(body, dict):
        raise WireError(f"{cls.__name__}: body is not a map")
    names = {f.name for f in dataclasses.fields(cls)}
    if not set(body) <= names:
        raise WireError(f"{cls.__name__}: unknown fields {sorted(set(body) - names)}")
    values = dict(body)
    try:
        if "sampling" in values:
            values["sampling"] = _sampling(values["sampling"])
        if "tree" in values:
            values["tree"] = _from_plain(Candidate, values["tree"])
        if cls in _ITEM_TYPES:
            values["items"] = [_from_plain(_ITEM_TYPES[cls], item) for item in values.get("items", [])]
        message = cls(**values)
    except TypeError as error:
        raise WireError(f"{cls.__name__}: {error}") from None
    _check_types(message)
    return message


def _sampling(body: Any) -> SamplingParams:
    """The core's sampling parameters, checked: the one conversion from the wire."""
    if not isinstance(body, dict):
        raise WireError("sampling: body is not a map")
    unknown = set(body) - {"temperature", "top_p", "seed"}
    if unknown:
        raise WireError(f"sampling: unknown fields {sorted(map(str, unknown))}")
    numbers = {k: v for k, v in body.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(numbers) != len(body) or not isinstance(body.get("seed", 0), int):
        raise WireError("sampling: temperature and top_p must be numbers, seed an integer")
    try:
        return SamplingParams(float(body.get("temperature", 0.0)), float(body.get("top_p", 1.0)), int(body.get("seed", 0)))
    except ValueError as error:
        raise WireError(f"bad sampling parameters: {error}") from None


def _check_types(message: Any) -> None:
    # Shallow type checks of the fields that index tensors or keys: enough to turn garbage into
    # a WireError before it reaches a model.
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        kind = str(f.type)
        ok = True
        if kind == "str":
            ok = isinstance(value, str)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float))
        elif kind == "list[int]":
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        elif kind == "list[str]":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif kind == "bytes":
            ok = isinstance(value, bytes)
        if not ok:
            raise WireError(f"{type(message).__name__}.{f.name}: expected {kind}, got {type(value).__name__}")
