"""Speculation-window control from verification results.

First version of the controller: additive increase when a round accepts everything it drafted,
decrease when it accepts nothing, within configured bounds. The pipeline's coordinator will feed
it verifier load as well (roadmap item 2); the interface stays ``next_window(state, result)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    initial: int = 4
    minimum: int = 1
    maximum: int = 8
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError(
                f"need 0 <= min_window <= window <= max_window, got {self.minimum}, {self.initial}, {self.maximum}"
            )

    def next_window(self, window: int, drafted: int, accepted: int) -> int:
        """The window for the next round, given how the last one went."""
        if not self.adaptive or drafted == 0:
            return window
        if accepted >= drafted:
            return min(window + 1, self.maximum)
        if accepted == 0:
            return max(window - 1, self.minimum)
        return window


def capped_window(window: int, cap: int) -> int:
    """A window under a request's cap (-1: none)."""
    return window if cap < 0 else min(window, cap)


def ahead_window(window: int, maximum: int, budget_ms: float | None, job_ms: Callable[[int], float]) -> int:
    """The window a drafter drafts a request's next round at ahead of its job (pipelining): one
    longer than this round's (a fully accepted round lengthens the adaptive window), shortened
    until the work — the guessed target token and the window, ``job_ms(tokens)`` — fits in the
    time the drafter expects before its next job (``budget_ms``, ``ahead_budget``; None: not
    known yet). Work still running when a job comes delays it: a guess that missed would cost
    the round. 0: none fits."""
    ahead = min(window + 1, max(window, maximum))
    if budget_ms is None:
        return ahead
    while ahead > 0 and job_ms(ahead + 1) > budget_ms:
        ahead -= 1
    return ahead


def ahead_budget(turnaround_ms: float | None, now_ms: float, request: str, written: Mapping[str, tuple[int, float]]) -> float | None:
    """The time a drafter has for drafting ``request``'s next round ahead: until the first job
    it expects, the request's own (a turnaround after its draft was written; now if not in
    ``written``) or another request's whose draft it wrote lately (``written``: request ->
    (round, ms written), newest last: the drafter's other requests come back too, and work
    drafted ahead delays their jobs as much). One overdue by more than a turnaround is taken to
    have gone elsewhere (another drafter of the expert, or the request ended); one overdue by
    less may come any moment. None: the turnaround is not known yet."""
    if turnaround_ms is None:
        return None
    own = written.get(request)
    budget = (own[1] if own is not None else now_ms) + turnaround_ms - now_ms
    for other, (_, written_ms) in reversed(written.items()):
        if other == request:
            continue
        due = written_ms + turnaround_ms - now_ms
        if due <= -turnaround_ms:
            break  # this one and every older one gone elsewhere
        budget = min(budget, due)
    return max(0.0, budget)


@dataclass(slots=True)
class Turnaround:
    """A drafter's running estimate of the time from writing a request's draft to reading the
    request's next job (the round's verification and the hops around it)."""

    smoothing: float = 0.2
    ms: float | None = None

    def observe(self, ms: float) -> None:
        self.ms = ms if self.ms is None else self.ms + self.smoothing * (ms - self.ms)
