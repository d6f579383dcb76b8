"""The request hash (``req:{id}``): how a ``RequestState`` is laid out in Redis fields.

Workers keep no request state of their own: everything needed to continue a request after any
worker dies is in this hash. The coordinator reads it, advances it (``cosine.core.rounds``) and
writes it back atomically (compare-and-set on ``round``).
"""

from __future__ import annotations

import json

import msgpack

from cosine.core.params import SamplingParams
from cosine.core.rounds import RequestState


def round_fields(state: RequestState) -> dict[str, bytes | str]:
    """The fields a round may change: what the coordinator writes back (not the prompt again)."""
    return {
        "status": state.status,
        "round": str(state.round),
        "window": str(state.window),
        "output_ids": msgpack.packb(state.output_ids),
        "emitted_chars": str(state.emitted_chars),
        "rounds": str(state.rounds),
        "draft_tokens": str(state.draft_tokens),
        "drafted_rounds": str(state.drafted_rounds),
        "accepted_tokens": str(state.accepted_tokens),
        "fingerprint": state.fingerprint,
        "routing": json.dumps(state.routing) if state.routing is not None else "",
        "drafters": json.dumps(state.drafters),
        "experts": json.dumps(state.experts),
    }


def state_to_fields(state: RequestState) -> dict[str, bytes | str]:
    """The request hash's fields: those written once, at admission, and the round's."""
    return {
        "id": state.request_id,
        "prompt_ids": msgpack.packb(state.prompt_ids),
        "sampling": json.dumps([state.sampling.temperature, state.sampling.top_p, state.sampling.seed]),
        "max_tokens": str(state.max_tokens),
        "stop": json.dumps(list(state.stop)),
        "eos_ids": json.dumps(list(state.eos_ids)),
        "created_ms": str(state.created_ms),
        "deadline_ms": str(state.deadline_ms),
        "logprobs": str(state.logprobs),
        "max_window": str(state.max_window),
        **round_fields(state),
    }


def state_from_fields(fields: dict[bytes, bytes]) -> RequestState | None:
    """The state in a request hash; None for a refused request's tombstone."""
    f = {k.decode(): v for k, v in fields.items()}
    if "prompt_ids" not in f:
        return None
    text = lambda name: f[name].decode()  # noqa: E731
    temperature, top_p, seed = json.loads(f["sampling"])
    return RequestState(
        request_id=text("id"),
        prompt_ids=list(msgpack.unpackb(f["prompt_ids"])),
        sampling=SamplingParams(temperature, top_p, seed),
        max_tokens=int(f["max_tokens"]),
        stop=tuple(json.loads(f["stop"])),
        eos_ids=tuple(json.loads(f["eos_ids"])),
        experts=json.loads(f["experts"]),
        status=text("status"),
        round=int(f["round"]),
        window=int(f["window"]),
        output_ids=list(msgpack.unpackb(f["output_ids"])),
        emitted_chars=int(f["emitted_chars"]),
        rounds=int(f["rounds"]),
        draft_tokens=int(f["draft_tokens"]),
        drafted_rounds=int(f.get("drafted_rounds", b"0")),
        accepted_tokens=int(f["accepted_tokens"]),
        fingerprint=text("fingerprint"),
        created_ms=int(f["created_ms"]),
        deadline_ms=int(f.get("deadline_ms", b"0")),
        cancel_requested="cancel" in f,
        feature_rows=int(f.get("feat_n", b"0")),
        routing=json.loads(f["routing"]) if f.get("routing") else None,
        drafters=json.loads(f.get("drafters", b"{}")),
        logprobs=int(f.get("logprobs", b"-1")),
        max_window=int(f.get("max_window", b"-1")),
    )
