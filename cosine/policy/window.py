"""Speculation-window control from verification results.

First version of the controller: additive increase when a round accepts everything it drafted,
decrease when it accepts nothing, within configured bounds. The pipeline's coordinator will feed
it verifier load as well (roadmap item 2); the interface stays ``next_window(state, result)``.
"""

from __future__ import annotations

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
