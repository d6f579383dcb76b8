"""A suffix datastore: a model-free drafter that continues the context the way earlier outputs
continued the same tokens (SuffixDecoding-style, with bounded n-gram tables instead of a suffix
tree).

One datastore per domain (``DraftRequest.domain``: the request's first-choice expert), so code
requests learn from code outputs. Every drafted request feeds it: each round adds the tokens
committed since the last round (O(new tokens) per round), so the datastore holds the prompts and
outputs of the requests it served, the current one included. For each context suffix of 1 ..
``max_depth`` tokens it counts which token came next; drafting follows the longest suffix seen
at least ``min_count`` times and proposes its most frequent continuation, whose empirical
frequency is the confidence (the design's rule for model-free drafters). A store keeps at most
``max_tokens`` tokens of history; the oldest sequence's counts are taken out when it is exceeded.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from cosine.core.tree import DraftChain
from cosine.drafters.base import Drafter, DraftRequest

MAX_TRACKED_REQUESTS = 1024


class SuffixStore:
    """Next-token counts per context suffix over a bounded history of sequences."""

    def __init__(self, max_depth: int = 8, max_tokens: int = 200_000) -> None:
        if max_depth < 1 or max_tokens < 1:
            raise ValueError("max_depth and max_tokens must be >= 1")
        self.max_depth = max_depth
        self.max_tokens = max_tokens
        self.table: dict[tuple[int, ...], Counter] = {}
        self.sequences: OrderedDict[str, list[int]] = OrderedDict()  # oldest first
        self.tokens = 0

    def extend(self, key: str, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to sequence ``key`` (new or continued), counting every suffix that
        ends just before each new token."""
        sequence = self.sequences.get(key)
        if sequence is None:
            sequence = self.sequences[key] = []
        for token in tokens:
            self._count(sequence, token, +1)
            sequence.append(token)
        self.tokens += len(tokens)
        while self.tokens > self.max_tokens and len(self.sequences) > 1:
            oldest = next(iter(self.sequences))
            if oldest == key:
                self.sequences.move_to_end(key)
                continue
            self._forget(self.sequences.pop(oldest))

    def _count(self, sequence: list[int], token: int, sign: int) -> None:
        for depth in range(1, min(self.max_depth, len(sequence)) + 1):
            suffix = tuple(sequence[-depth:])
            counts = self.table.get(suffix)
            if counts is None:
                if sign < 0:
                    continue
                counts = self.table[suffix] = Counter()
            counts[token] += sign
            if counts[token] <= 0:
                del counts[token]
                if not counts:
                    del self.table[suffix]

    def _forget(self, sequence: list[int]) -> None:
        for end in range(len(sequence)):
            self._count(sequence[:end][-self.max_depth :], sequence[end], -1)
        self.tokens -= len(sequence)

    def next_token(self, context: Sequence[int], min_count: int, min_depth: int = 1) -> tuple[int, float] | None:
        """The most frequent continuation of the longest suffix of ``context`` (at least
        ``min_depth`` tokens) seen at least ``min_count`` times, with its share of that suffix's
        continuations."""
        for depth in range(min(self.max_depth, len(context)), min_depth - 1, -1):
            counts = self.table.get(tuple(context[-depth:]))
            if counts:
                total = sum(counts.values())
                if total >= min_count:
                    token, count = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
                    return token, count / total
        return None

    def clear(self) -> None:
        self.table.clear()
        self.sequences.clear()
        self.tokens = 0


class SuffixDrafter(Drafter):
    """Drafts from a per-domain ``SuffixStore``; stops a chain where the confidence of its
    tokens so far (their product) falls below ``min_confidence``. Proposals are fixed (no
    distribution): verification treats them as one-hot drafts."""

    drafts_ahead = False  # it learns from every context it sees: a guessed one would teach it drafts

    def __init__(self, name: str = "suffix", *, max_depth: int = 8, max_tokens: int = 200_000, min_count: int = 2, min_confidence: float = 0.1, min_depth: int = 2) -> None:
        self.name = name
        self.max_depth = max_depth
        self.max_tokens = max_tokens
        self.min_count = min_count
        self.min_confidence = min_confidence
        self.min_depth = min_depth
        self.stores: dict[str, SuffixStore] = {}
        self.seen: OrderedDict[str, int] = OrderedDict()  # request key -> tokens already added

    def store(self, domain: str) -> SuffixStore:
        store = self.stores.get(domain)
        if store is None:
            store = self.stores[domain] = SuffixStore(self.max_depth, self.max_tokens)
        return store

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftChain]:
        return [self._propose_one(r) for r in requests]

    def _propose_one(self, request: DraftRequest) -> DraftChain:
        store = self.store(request.domain)
        self._learn(store, request.key, request.context)
        if request.window <= 0:
            return DraftChain((), (), None, self.name)
        context = list(request.context[-self.max_depth :])
        tokens, confidences, running = [], [], 1.0
        for _ in range(request.window):
            found = store.next_token(context, self.min_count, self.min_depth)  # a one-token match is a unigram guess
            if found is None:
                break
            token, confidence = found
            running *= confidence
            if running < self.min_confidence:
                break
            tokens.append(token)
            confidences.append(confidence)
            context = (context + [token])[-self.max_depth :]
        return DraftChain(tuple(tokens), tuple(confidences), None, self.name)

    def _learn(self, store: SuffixStore, key: str, context: Sequence[int]) -> None:
        done = self.seen.pop(key, 0)
        if done > len(context):  # another request under the same key: start it again
            done = 0
        store.extend(key, context[done:])
        self.seen[key] = len(context)
        while len(self.seen) > MAX_TRACKED_REQUESTS:
            self.seen.popitem(last=False)

    def clear(self) -> None:
        """Empty every datastore (benchmarks measure from an empty one)."""
        for store in self.stores.values():
            store.clear()
        self.seen.clear()
