"""Verification batch forming, pure (no I/O; tested without Redis): which pooled candidates go
into the next batch and to which verifier, how many tokens its rounds without drafts decode,
and where a round's drafting job goes. The coordinator's batching stage feeds it what it read
(the pool, the verifiers' rosters and queues) and writes what it decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cosine.policy.batching import BatchPolicy, Pending
from cosine.wire import VerifyItem

from .records import Drafting

DRAFTER_BACKLOG = 4  # jobs waiting unread in a drafter's own stream before its requests go to an idle drafter of the expert


@dataclass
class Waiting:
    """A pooled candidate: its entry, the item it becomes, and what the batch policy weighs.
    A round pooled in place (``local``: the coordinator that applied its request's last round
    pooled its next one, without drafts, without a candidates entry) has an id of its own that
    no stream holds."""

    entry_id: bytes
    item: VerifyItem
    arrived: float
    fed_tokens: int = 1  # what the verifier feeds: the tree and the new token, the prompt in a first round
    expected: float = 1.0  # tokens the round is expected to commit
    depth: int = 0  # of the drafted tree
    room: int = 1  # tokens the request may still make (max_tokens)
    local: bool = False  # pooled in place: nothing to acknowledge


@dataclass(frozen=True, slots=True)
class Verifiers:
    """The live verifiers as the last reads saw them."""

    live: frozenset[str] = frozenset()  # instances
    count: int = 0
    kv_rows: Mapping[str, int] = dataclasses.field(default_factory=dict)  # instance -> rows of its K/V pool
    kv_block: int = 1  # rows per pool block
    busy_at: Mapping[str, int] = dataclasses.field(default_factory=dict)  # instance -> batches of its own stream queued or in hand
    steal: bool = False  # some verifier is free: busy homes' requests go to the shared stream
    affinity: bool = True


def batch_home(home: str, verifiers: Verifiers) -> str:
    """The live verifier instance that holds a request's caches (``home``: the one that verified
    its last round), or "" (any verifier): also when that one has work while another is free."""
    if home not in verifiers.live or not verifiers.affinity:
        return ""
    return "" if verifiers.steal and verifiers.busy_at.get(home, 0) else home


def kv_rows_of(item: VerifyItem, block: int) -> int:
    """K/V pool rows a verification item holds: its context and tree, in whole blocks."""
    rows = item.context_len + len(item.tree.tokens)
    return -(-rows // max(1, block)) * max(1, block)


def drafting_due_s(drafting: Iterable[Drafting], now: float, draft_ms: Callable[[int, int], float]) -> float:
    """How long until the last round drafting now is expected back (0: none is). One prediction
    per (window, requests drafting at once): under load most rounds drafting share a few."""
    predicted: dict[tuple[int, int], float] = {}
    due = 0.0
    for d in drafting:
        key = (d.window, d.together)
        if key not in predicted:
            predicted[key] = draft_ms(*key) / 1000
        due = max(due, d.sent + predicted[key] - now)
    return due


def next_batch(
    pool: list[Waiting], now: float, homes: Callable[[str], str], verifiers: Verifiers, policy: BatchPolicy, choice: str,
    cost_ms: Callable[[int, int], float], latency_weight: float, starve_s: float,
) -> tuple[list[Waiting], str, str]:
    """The next batch of a non-empty pool: (its candidates, its verifier instance or "", its
    target fingerprint). One batch serves one target, the oldest candidate's, and goes to one
    verifier (cache affinity), the oldest candidate's home; requests new to every verifier join
    any. Which candidates: first come (``choice`` "fifo") or by the cost model (value per
    verification ms, none passed over past ``starve_s``), within the home's K/V pool."""
    fingerprint = pool[0].item.fingerprint
    home = homes(pool[0].item.request_id)
    same = [w for w in pool if w.item.fingerprint == fingerprint and homes(w.item.request_id) in (home, "")]
    pending = [Pending(now - w.arrived, w.fed_tokens, w.expected, w.item.round == 0, kv_rows_of(w.item, verifiers.kv_block)) for w in same]
    kv_rows = verifiers.kv_rows.get(home) or min(verifiers.kv_rows.values(), default=0)  # the home's pool, else the smallest
    if choice == "fifo":
        chosen = policy.first_come(pending, kv_rows)
    else:
        chosen = policy.select(pending, cost_ms, latency_weight, starve_s, kv_rows)
    return [same[i] for i in chosen], home, fingerprint


def multi_steps(
    limit: int, taken: list[Waiting], left: int, active: int, drafting: list[Drafting], now: float,
    draft_ms: Callable[[int, int], float], verify_ms: Callable[[int, int, int], float], own_verifier: bool = False,
) -> int:
    """How many tokens a batch's rounds without drafts may decode in this one job (multi-step,
    at most ``limit``): every one when nobody would wait for it — the batch holds every active
    request, or every batch in verification has a verifier of its own (``own_verifier``: the
    requests in them come back to their own) — and no candidate stays pooled (``left``) and no
    round is drafting; else only as many as fit before the rounds drafting now are expected
    back (they would wait for this batch), at least one; one while candidates stay pooled, and
    one in a batch that also verifies drafted rounds (the batch's result, theirs included, comes
    back after its last step: each step would hold them a forward)."""
    if limit <= 1 or not taken or any(w.item.tree.tokens for w in taken):  # steps only for a batch all without drafts
        return 1
    if (len(taken) >= active or own_verifier) and not drafting and not left:
        return limit
    if left:
        return 1
    due_ms = min((max(0.0, d.sent + draft_ms(d.window, d.together) / 1000 - now) * 1000 for d in drafting), default=0.0)
    longest = max(w.item.context_len for w in taken)
    step_ms = max(1e-3, verify_ms(len(taken), len(taken), longest))
    return max(1, min(limit, 1 + int(due_ms / step_ms)))


def with_steps(waiting: Waiting, steps: int) -> VerifyItem:
    """The item as sent: a round without drafts (past a request's first, so that its first token
    comes at once) decodes up to ``steps`` tokens, never past the request's ``max_tokens``; one
    that asked for the target's states (feature drafters) or is a prefill chunk, one."""
    item = waiting.item
    if steps <= 1 or item.tree.tokens or item.round == 0 or item.features_from >= 0 or item.prefill_chunk > 0:
        return item
    return dataclasses.replace(item, steps=max(1, min(steps, waiting.room)))


def draft_home(home: str | None, expert: str, live: set[str], expert_of: Mapping[str, str], queued: Mapping[str, tuple[int, int]]) -> str:
    """The drafter instance a round's job for ``expert`` goes to: the live one that drafted the
    request's last round (``home``: its caches, its draft made ahead), or "" (the expert's
    stream); also "" when the home has a backlog (DRAFTER_BACKLOG jobs waiting unread) while
    another drafter of the expert has nothing queued or in hand: a slow or stuck home does not
    hold its requests while others idle."""
    if not home or home not in live:
        return ""
    waiting, _ = queued.get(home, (0, 0))
    if waiting >= DRAFTER_BACKLOG and any(queued.get(other, (0, 0)) == (0, 0) for other, served in expert_of.items() if served == expert and other != home):
        return ""
    return home
