"""Authoritative request state (a Redis hash per request) and how a verified round advances it.

Workers keep no request state of their own: everything needed to continue a request after any
worker dies is here. ``advance`` is pure given a tokenizer: the coordinator reads the state,
calls it, and applies the result atomically (compare-and-set on ``round``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import msgpack

from cosine.spec.routing import RequestRouting, RoundFeedback, RoutingPolicy, by_expert
from cosine.spec.sampling import SamplingParams
from cosine.spec.stopping import FINISH_ERROR, OutputAssembler, StopRules
from cosine.spec.window import WindowPolicy

ACTIVE = "active"
FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RequestState:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    eos_ids: tuple[int, ...]
    experts: list[str]
    status: str = ACTIVE
    round: int = 0
    window: int = 4
    output_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_rounds: int = 0  # rounds that verified at least one drafted token
    fingerprint: str = ""
    created_ms: int = 0
    deadline_ms: int = 0  # epoch ms: the request ends with error_code=deadline then
    cancel_requested: bool = False  # set only by the cancel function (never written back)
    feature_rows: int = 0  # rows in the features key (kept by the apply-round function; never written back)
    routing: dict | None = None  # RequestRouting.to_dict(): online routing scores (None: fixed experts)
    drafters: dict = field(default_factory=dict)  # drafter name -> [drafted, accepted]

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def stop_rules(self) -> StopRules:
        return StopRules(self.max_tokens, frozenset(self.eos_ids), self.stop)

    def to_fields(self) -> dict[str, bytes | str]:
        return {
            "id": self.request_id,
            "prompt_ids": msgpack.packb(self.prompt_ids),
            "sampling": json.dumps([self.sampling.temperature, self.sampling.top_p, self.sampling.seed]),
            "max_tokens": str(self.max_tokens),
            "stop": json.dumps(list(self.stop)),
            "eos_ids": json.dumps(list(self.eos_ids)),
            "experts": json.dumps(self.experts),
            "status": self.status,
            "round": str(self.round),
            "window": str(self.window),
            "output_ids": msgpack.packb(self.output_ids),
            "emitted_chars": str(self.emitted_chars),
            "rounds": str(self.rounds),
            "draft_tokens": str(self.draft_tokens),
            "drafted_rounds": str(self.drafted_rounds),
            "accepted_tokens": str(self.accepted_tokens),
            "fingerprint": self.fingerprint,
            "created_ms": str(self.created_ms),
            "deadline_ms": str(self.deadline_ms),
            "routing": json.dumps(self.routing) if self.routing is not None else "",
            "drafters": json.dumps(self.drafters),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> RequestState | None:
        """The state in a request hash; None for a refused request's tombstone."""
        f = {k.decode(): v for k, v in fields.items()}
        if "prompt_ids" not in f:
            return None
        text = lambda name: f[name].decode()  # noqa: E731
        temperature, top_p, seed = json.loads(f["sampling"])
        return cls(
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
        )

    @property
    def domain(self) -> str:
        """The request's first-choice expert (per-domain datastores key on it)."""
        return self.routing["first"] if self.routing else (self.experts[0] if self.experts else "")


@dataclass(frozen=True, slots=True)
class RoundUpdate:
    """What applying one verified round writes: the new state, output entries, whether done."""

    state: RequestState
    out_entries: list[dict[str, str]]
    finished: bool


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


def advance(
    state: RequestState,
    accepted_tokens: list[int],
    next_token: int,
    draft_tokens: int,
    tokenizer,
    policy: WindowPolicy,
    fingerprint: str = "",
    feedback: dict[str, RoundFeedback] | None = None,
    routing_policy: RoutingPolicy | None = None,
    expert_of: dict[str, str] | None = None,
) -> RoundUpdate:
    """Apply one verified round: clip by the stop rules, emit text, retune the window, count
    each drafter's drafted and accepted tokens (``feedback``) and, with online routing, move the
    routing scores and choose the next round's experts."""
    assembler = OutputAssembler(
        tokenizer,
        state.stop_rules,
        token_ids=list(state.output_ids),
        text=tokenizer.decode(state.output_ids, skip_special_tokens=True) if state.output_ids else "",
        emitted_chars=state.emitted_chars,
    )
    emission = assembler.extend([*accepted_tokens, next_token])
    kept_accepted = min(len(accepted_tokens), len(emission.token_ids))
    drafters = {name: list(counts) for name, counts in state.drafters.items()}
    for name, fed in (feedback or {}).items():
        counts = drafters.setdefault(name, [0, 0])
        counts[0] += fed.drafted
        counts[1] += fed.accepted
    routing, experts = state.routing, state.experts
    if routing is not None and routing_policy is not None:
        online = RequestRouting.from_dict(routing)
        online.observe(by_expert(feedback or {}, expert_of or {}), len(accepted_tokens), routing_policy)
        experts = online.choose(routing_policy)
        routing = online.to_dict()
    new_state = replace(
        state,
        round=state.round + 1,
        output_ids=list(assembler.token_ids),
        emitted_chars=assembler.emitted_chars,
        rounds=state.rounds + 1,
        draft_tokens=state.draft_tokens + draft_tokens,
        drafted_rounds=state.drafted_rounds + (draft_tokens > 0),
        accepted_tokens=state.accepted_tokens + kept_accepted,
        window=policy.next_window(state.window, draft_tokens, len(accepted_tokens)),
        fingerprint=state.fingerprint or fingerprint,
        status=FINISHED if emission.finish_reason else ACTIVE,
        drafters=drafters,
        routing=routing,
        experts=experts,
    )
    entries = []
    if emission.token_ids or emission.text:
        entries.append({"type": "tokens", "text": emission.text, "token_ids": json.dumps(list(emission.token_ids))})
    if emission.finish_reason:
        entries.append(final_entry(new_state, assembler.text, emission.finish_reason))
    return RoundUpdate(new_state, entries, emission.finish_reason is not None)


def fail(state: RequestState, tokenizer, reason: str, finish_reason: str = FINISH_ERROR, error_code: str = "internal") -> RoundUpdate:
    """Finish a request early (error, deadline or cancellation), keeping what it produced."""
    new_state = replace(state, round=state.round + 1, status=FINISHED)
    text = tokenizer.decode(state.output_ids, skip_special_tokens=True) if state.output_ids else ""
    entries = []
    if len(text) > state.emitted_chars:  # release held-back text so the pieces join to `text`
        entries.append({"type": "tokens", "text": text[state.emitted_chars :], "token_ids": "[]"})
    entries.append(final_entry(new_state, text, finish_reason, reason, error_code))
    return RoundUpdate(new_state, entries, True)
