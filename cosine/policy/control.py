"""Adaptive speculation control from the verifier's load (the paper's, with a cost model).

A round with window ``w`` for a request whose drafted tokens are accepted with probability
``alpha`` each yields ``E(w) = (1 - alpha^(w+1)) / (1 - alpha)`` tokens on average (accepted
prefix plus the target's own token; ``E(0) = 1``). It costs the drafting hop ``D(w)`` (zero at
window 0: the round goes straight to verification) plus the verification of a batch of ``B``
requests feeding ``T`` tokens, ``V(B, T) = a + b B + c T``. The controller picks, per request
and round, the window in ``0 .. limit`` that maximises ``E(w) / (D(w) + V(B, B (1 + w)))``
(every request of the batch assumed at the same window): at low load the long verification
of one token makes drafting pay; when the verifier is busy each drafted token costs more than
its expected yield and the window goes to 0, so the verifier decodes plainly in large batches.

``V`` starts from the verifier's start-up profile and ``D`` from a prior; both are refitted by
least squares over the most recent observations (with the profile as a ridge prior, so a few
observations at one batch size do not make the fit wild).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def expected_tokens(alpha: float, window: int) -> float:
    """Tokens a round yields on average: accepted drafted tokens plus the target's own."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1 - alpha ** (window + 1)) / (1 - alpha)


def acceptance_estimate(accepted: float, drafted_rounds: float, prior: float = 0.5, prior_rounds: float = 2.0) -> float:
    """Per-token acceptance, the geometric estimate: accepted tokens / (accepted + rounds that
    drafted; each drafted round ends in at most one rejection), with ``prior_rounds`` pseudo
    rounds at acceptance ``prior`` (all requests' so far, for a request that has drafted little)."""
    prior = min(max(prior, 0.0), 0.95)
    pseudo_accepted = prior_rounds * prior / (1 - prior)
    return (accepted + pseudo_accepted) / (accepted + drafted_rounds + pseudo_accepted + prior_rounds)


@dataclass
class LinearCost:
    """``y = w . x`` fitted by ridge least squares toward ``prior`` over the last ``keep``
    observations (features include the constant 1).

    The normal equations are kept as running sums (a row in, the oldest row out), so an
    observation costs O(features^2) and a refit one small solve, whatever ``keep`` is.
    """

    prior: Sequence[float]
    keep: int = 256
    strength: float = 4.0  # weight of the prior, in observations
    _rows: deque = field(default_factory=deque)
    _coef: list[float] | None = None

    def __post_init__(self) -> None:
        self.prior = [float(p) for p in self.prior]
        n = len(self.prior)
        self._rows = deque()
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self._abs = np.zeros(n)  # sum of |x| per feature: the prior's scale
        self._coef = list(self.prior)

    def observe(self, features: Sequence[float], value: float) -> None:
        x = np.asarray(features, dtype=np.float64)
        self._rows.append((x, float(value)))
        self._add(x, float(value), 1.0)
        if len(self._rows) > self.keep:
            old, old_value = self._rows.popleft()
            self._add(old, old_value, -1.0)
        self._coef = None

    def _add(self, x: np.ndarray, value: float, sign: float) -> None:
        self._xtx += sign * np.outer(x, x)
        self._xty += sign * value * x
        self._abs += sign * np.abs(x)

    @property
    def observations(self) -> int:
        return len(self._rows)

    @property
    def coefficients(self) -> list[float]:
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def predict(self, features: Sequence[float]) -> float:
        return max(0.0, sum(c * f for c, f in zip(self.coefficients, features)))

    def set_prior(self, prior: Sequence[float]) -> None:
        self.prior = [float(p) for p in prior]
        self._coef = None

    def _fit(self) -> list[float]:
        if not self._rows:
            return list(self.prior)
        prior = np.asarray(self.prior, dtype=np.float64)
        # Scale each feature so the prior's pull is comparable across them.
        scale = np.maximum(self._abs / len(self._rows), 1.0)
        regulariser = np.diag(self.strength * scale**2)
        coef = np.linalg.solve(self._xtx + regulariser, self._xty + regulariser @ prior)
        return [max(0.0, float(c)) for c in coef]


@dataclass
class SpeculationControl:
    """Chooses each round's window from the acceptance estimate and the measured costs (ms)."""

    verify_prior: Sequence[float] = (30.0, 2.0, 1.0)  # a, b (per request), c (per fed token)
    draft_prior: Sequence[float] = (10.0, 2.0)  # d0, d1 (per drafted token)
    enabled: bool = True
    decay: float = 0.995  # of the shared acceptance sums, per drafted round
    prior_rounds: float = 4.0  # weight of the shared prior in a request's estimate, in rounds
    explore_until: int = 32  # drafted rounds observed before the model alone decides
    explore_every: int = 50  # then one round in this many drafts at its adaptive window
    verify: LinearCost = field(init=False)
    draft: LinearCost = field(init=False)

    def __post_init__(self) -> None:
        self.verify = LinearCost(self.verify_prior)
        self.draft = LinearCost(self.draft_prior)
        self._accepted = 0.0
        self._rounds = 0.0

    def observe_verification(self, batch_size: int, fed_tokens: int, ms: float) -> None:
        self.verify.observe((1.0, batch_size, fed_tokens), ms)

    def observe_drafting(self, window: int, ms: float) -> None:
        self.draft.observe((1.0, window), ms)

    def observe_round(self, drafted: int, accepted: int) -> None:
        """A verified round of any request: the shared acceptance prior (decayed sums)."""
        if drafted > 0:
            self._accepted = self._accepted * self.decay + accepted
            self._rounds = self._rounds * self.decay + 1

    @property
    def acceptance_prior(self) -> float:
        """All requests' recent per-token acceptance (0.5 before any drafted round)."""
        return acceptance_estimate(self._accepted, self._rounds)

    def acceptance(self, accepted: int, drafted_rounds: int) -> float:
        """A request's per-token acceptance, its own rounds on top of the shared prior."""
        return acceptance_estimate(accepted, drafted_rounds, self.acceptance_prior, self.prior_rounds)

    def describe(self) -> str:
        a, b, c = self.verify.coefficients
        d0, d1 = self.draft.coefficients
        return (f"verify {a:.1f} ms + {b:.2f}/request + {c:.2f}/token ({self.verify.observations} batches); "
                f"draft {d0:.1f} ms + {d1:.2f}/token ({self.draft.observations} rounds); acceptance prior {self.acceptance_prior:.2f}")

    def verify_ms(self, batch_size: int, fed_tokens: int) -> float:
        return self.verify.predict((1.0, batch_size, fed_tokens))

    def draft_ms(self, window: int) -> float:
        return 0.0 if window <= 0 else self.draft.predict((1.0, window))

    def rate(self, alpha: float, window: int, batch_size: int) -> float:
        """Expected tokens per ms of one request's round at this window and batch size."""
        batch_size = max(1, batch_size)
        seconds = self.draft_ms(window) + self.verify_ms(batch_size, batch_size * (1 + window))
        return expected_tokens(alpha, window) / max(seconds, 1e-6)

    def explore(self, key: str, round_index: int) -> bool:
        """Whether this round drafts at its adaptive window whatever the model says: until the
        drafting model has ``explore_until`` observations, then one round in ``explore_every``
        (chosen by a hash of the request and round, so every coordinator agrees) — at window 0
        the model would otherwise never learn that drafting got cheaper or better."""
        if self.draft.observations < self.explore_until:
            return True
        digest = hashlib.blake2b(f"{key}:{round_index}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little") % self.explore_every == 0

    def choose(self, alpha: float, limit: int, batch_size: int) -> int:
        """The window in 0 .. limit with the highest expected rate (ties: the smaller)."""
        if not self.enabled or limit <= 0:
            return max(0, limit)
        best, best_rate = 0, self.rate(alpha, 0, batch_size)
        for window in range(1, limit + 1):
            rate = self.rate(alpha, window, batch_size)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = window, rate
        return best
