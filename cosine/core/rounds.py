"""Request state and how a verified round advances it (pure: no I/O).

Workers keep no request state of their own: everything needed to continue a request after any
worker dies is here. ``advance`` is pure given a tokenizer: the coordinator reads the state,
calls it, and applies the result atomically (compare-and-set on ``round``).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace

from cosine.core.logprobs import token_logprobs
from cosine.core.params import SamplingParams
from cosine.core.protocol import Final, tokens_entry
from cosine.core.stopping import FINISH_ERROR, OutputAssembler, StopRules
from cosine.policy.routing import RequestRouting, RoundFeedback, RoutingPolicy, by_expert
from cosine.policy.window import WindowPolicy

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
    logprobs: int = -1  # >= 0: tokens entries carry log-probabilities with this many alternatives
    max_window: int = -1  # >= 0: the request's cap on its speculation window (0: no drafting); -1: none

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def stop_rules(self) -> StopRules:
        return StopRules(self.max_tokens, frozenset(self.eos_ids), self.stop)

    @property
    def domain(self) -> str:
        """The request's first-choice expert (per-domain datastores key on it)."""
        return self.routing["first"] if self.routing else (self.experts[0] if self.experts else "")


@dataclass(frozen=True, slots=True)
class RoundUpdate:
    """What applying one verified round writes: the new state, output entries, whether done
    (``final``: the request's final entry, typed, when it ended)."""

    state: RequestState
    out_entries: list[dict[str, str]]
    finished: bool
    final: Final | None = None


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
    text_cache: MutableMapping[str, tuple[int, tuple[int, ...], str]] | None = None,
    logprobs: list | None = None,
    decoded: Sequence[int] = (),
) -> RoundUpdate:
    """Apply one verified round: clip by the stop rules, emit text, retune the window, count
    each drafter's drafted and accepted tokens (``feedback``) and, with online routing, move the
    routing scores and choose the next round's experts. ``logprobs`` (the verifier's rows for
    the round's tokens, when the request asked for them) go into the tokens entry, one per token.
    ``decoded``: a multi-step round's tokens after ``next_token`` (the target decoded them without
    drafts); each is clipped by the stop rules like any other, and none counts as accepted.

    ``text_cache`` (request -> output length, its last tokens, its text), kept by the caller
    across rounds, spares decoding the whole output again each round: an entry is used only
    when it matches the state's output (another worker may have applied rounds since)."""
    assembler = OutputAssembler(
        tokenizer,
        state.stop_rules,
        token_ids=list(state.output_ids),
        text=_output_text(state, tokenizer, text_cache),
        emitted_chars=state.emitted_chars,
    )
    emission = assembler.extend([*accepted_tokens, next_token, *decoded])
    if text_cache is not None:
        if emission.finish_reason:
            text_cache.pop(state.request_id, None)
        else:
            text_cache[state.request_id] = (len(assembler.token_ids), tuple(assembler.token_ids[-TEXT_CHECK_TOKENS:]), assembler.text)
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
        listed = token_logprobs(tokenizer, emission.token_ids, logprobs or []) if state.logprobs >= 0 else None
        entries.append(tokens_entry(emission.text, emission.token_ids, listed))
    if emission.finish_reason:
        final = Final.of(new_state, assembler.text, emission.finish_reason)
        entries.append(final.to_fields())
        return RoundUpdate(new_state, entries, True, final)
    return RoundUpdate(new_state, entries, False)


TEXT_CHECK_TOKENS = 8  # a cached text is the state's when the length and these last tokens match


def _output_text(state: RequestState, tokenizer, text_cache) -> str:
    if not state.output_ids:
        return ""
    cached = text_cache.get(state.request_id) if text_cache is not None else None
    if cached is not None and cached[0] == len(state.output_ids) and cached[1] == tuple(state.output_ids[-TEXT_CHECK_TOKENS:]):
        return cached[2]
    return tokenizer.decode(state.output_ids, skip_special_tokens=True)


def fail(state: RequestState, tokenizer, reason: str, finish_reason: str = FINISH_ERROR, error_code: str = "internal") -> RoundUpdate:
    """Finish a request early (error, deadline or cancellation), keeping what it produced."""
    new_state = replace(state, round=state.round + 1, status=FINISHED)
    text = tokenizer.decode(state.output_ids, skip_special_tokens=True) if state.output_ids else ""
    entries = []
    if len(text) > state.emitted_chars:  # release held-back text so the pieces join to `text`
        entries.append(tokens_entry(text[state.emitted_chars :], []))
    final = Final.of(new_state, text, finish_reason, reason, error_code)
    entries.append(final.to_fields())
    return RoundUpdate(new_state, entries, True, final)
