"""Adaptive speculation control from the verifier's load (the paper's, with a cost model).

A round with window ``w`` yields ``E(w) = 1 + p1 + p1 p2 + ... + p1 ... pw`` tokens on average
(the accepted prefix plus the target's own token; ``E(0) = 1``), where ``p_i`` is the chance
that draft position ``i`` is accepted once the positions before it were: measured over all
requests' recent rounds (``AcceptanceCurve``; positions are far from equally likely: here about
0.5, 0.35, 0.3, then higher), scaled for a request by how its own acceptance compares.

A round costs a fixed overhead ``R`` (the hops through Redis, the coordinator, batch forming:
measured, per round, as what the round's wall time leaves over after drafting and verifying),
the drafting hop ``D(w, k) = d0 + d1 w + d2 k w`` for ``k`` requests drafting at once (zero at
window 0: the round goes straight to verification) and the verification of a batch of ``B`` requests feeding ``T`` tokens with the
longest context ``L``, ``V = a + b B + c T + e B L / 1000``. The controller picks, per request
and round, the window in ``0 .. limit`` that maximises ``E(w) / (R + D(w, B) + V(B, B (1 + w), L))``
(every request of the batch assumed at the same window; ``plan`` decides a batch's requests
together): at low load the long verification
of one token makes drafting pay; when the verifier is busy each drafted token costs more than
its expected yield and the window goes to 0, so the verifier decodes plainly in large batches.

``V`` starts from the verifier's start-up profile and ``D`` from a prior; both are refitted by
least squares over the most recent observations (with the profile as a ridge prior, so a few
observations at one batch size do not make the fit wild).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

POSITIONS = 16  # draft positions the acceptance curve tracks (deeper ones reuse the last)


def verify_features(batch_size: int, fed_tokens: int, longest_context: float) -> tuple[float, ...]:
    """The verification cost model's features: ``V = a + b B + c T + e B L / 1000`` (the
    verifier's start-up profile fits the same)."""
    return (1.0, batch_size, fed_tokens, batch_size * longest_context / 1000)


# The start-up profiles' calls: the verifier's forwards (requests, new tokens each, cached
# context) and the drafters' calls (requests, window), fitted to the features below; the ideal
# simulation fits the same calls to the emulated profiles.
VERIFY_PROFILE_CALLS = ((1, 1, 64), (1, 5, 64), (4, 1, 64), (4, 5, 64), (8, 3, 64), (2, 1, 448), (2, 5, 448))
DRAFT_PROFILE_CALLS = ((1, 1), (1, 4), (4, 1), (4, 4), (2, 2))


# How firmly the drafting fit keeps to its prior, per feature: the per-token terms come from the
# drafters' own start-up profiles (their compute, known well), the fixed part is the hop (the
# network, fusion, the coordinator's wake-ups: known only from observing it). Rounds at one
# window cannot tell a fixed cost from a per-token one: with an even prior a hop measured at
# window 1 was read as per-token cost, a longer window priced at several hops, and load control
# then kept windows short or at 0 for good (it observes no other windows there).
DRAFT_PRIOR_STRENGTHS = (0.02, 1.0, 1.0)
# A drafting hop counts as at most this many times its prediction: the first rounds after a
# start go to drafters still starting (950 ms hops among 45 ms ones), and one such round in a
# least-squares fit of thirty priced every window twice over, for good at one request (load
# control then chose window 0 and observed little drafting again).
DRAFT_CLIP = 4.0
# Drafters with compute of their own cooperate on a round while the verifier takes their chains
# for at most this much more than one chain's forward (``SpeculationControl.cooperating``).
COOPERATION_SLACK = 1.25


def draft_features(window: int, together: int = 1) -> tuple[float, ...]:
    """The drafting cost model's features: ``D = d0 + d1 w + d2 k w`` (drafters' start-up
    profiles fit the same)."""
    return (1.0, window, max(1, together) * window)


def drafting_prior(profiles: Sequence[Sequence[float]], default: Sequence[float], expected: int = 0) -> list[float]:
    """The drafting cost model's prior from drafters' start-up profiles ``(d0, d1, d2)``: the
    median of each term once at least half of the ``expected`` drafters have published one
    (else ``default``): drafters profile while the others start (the first to register showed
    118 ms fixed, or 14 ms per token, or nothing per token, against 0.08 + 1.47 measured
    alone), so the first few are the least to be trusted. The fixed part is at most
    ``default``'s: a profile times bare drafting calls, not the hop (the fit learns that from
    rounds), and a prior that high let a cold drafter's first hop (250 ms) into the fit
    unclipped."""
    if not profiles or 2 * len(profiles) < expected:
        return [float(d) for d in default]
    prior = [float(statistics.median(column)) for column in zip(*profiles)]
    prior[0] = min(prior[0], float(default[0]))
    return prior


def expected_tokens(alpha: float, window: int) -> float:
    """Tokens a round yields on average with every position accepted at ``alpha``."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1 - alpha ** (window + 1)) / (1 - alpha)


def acceptance_estimate(accepted: float, drafted_rounds: float, prior: float = 0.5, prior_rounds: float = 2.0) -> float:
    """Per-token acceptance, the geometric estimate: accepted tokens / (accepted + rounds that
    drafted; each drafted round ends in at most one rejection), with ``prior_rounds`` pseudo
    rounds at acceptance ``prior`` (all requests' so far, for a request that has drafted little)."""
    prior = min(max(prior, 0.0), 0.95)
    pseudo_accepted = prior_rounds * prior / (1 - prior)
    return (accepted + pseudo_accepted) / (accepted + drafted_rounds + pseudo_accepted + prior_rounds)


def optimistic_estimate(accepted: float, drafted_rounds: float, prior: float = 0.5, prior_rounds: float = 2.0, optimism: float = 1.0) -> float:
    """A request's per-token acceptance ``optimism`` standard deviations above its estimate (the
    spread of a Beta posterior: accepted tokens against drafted rounds, on top of the pseudo
    rounds): the upper bound a bandit plans with, so that a request drafts until its own rounds
    show that drafting does not pay, whatever rounds of other requests (or its own first, unlucky
    ones) said. The spread narrows with every drafted round."""
    estimate = acceptance_estimate(accepted, drafted_rounds, prior, prior_rounds)
    prior = min(max(prior, 0.0), 0.95)
    count = accepted + drafted_rounds + prior_rounds * prior / (1 - prior) + prior_rounds
    return min(0.95, estimate + optimism * math.sqrt(estimate * (1 - estimate) / (count + 1)))


@dataclass
class AcceptanceCurve:
    """Acceptance per draft position given the earlier positions were accepted, from decayed
    counts over all requests' drafted rounds.

    A round whose tree is ``depth`` deep and accepts ``k`` tokens reached positions 1 .. k + 1
    (up to ``depth``) and accepted 1 .. k. A position never reached takes the estimate of the
    one before it (the first: ``prior``) as its prior, ``prior_weight`` rounds strong.
    """

    decay: float = 0.995  # per drafted round
    prior: float = 0.5
    prior_weight: float = 2.0

    def __post_init__(self) -> None:
        self.reached = np.zeros(POSITIONS)
        self.accepted = np.zeros(POSITIONS)
        self.tokens = 0.0  # decayed accepted tokens (all positions, also past POSITIONS)
        self.rounds = 0.0  # decayed drafted rounds

    def observe(self, depth: int, accepted: int) -> None:
        if depth <= 0:
            return
        self.reached *= self.decay
        self.accepted *= self.decay
        self.tokens = self.tokens * self.decay + accepted
        self.rounds = self.rounds * self.decay + 1
        k = min(accepted, depth)
        self.reached[: min(k + 1, depth, POSITIONS)] += 1
        self.accepted[: min(k, POSITIONS)] += 1

    def conditional(self) -> list[float]:
        """p_1 .. p_POSITIONS."""
        out, prior = [], self.prior
        for reached, accepted in zip(self.reached, self.accepted):
            prior = (accepted + self.prior_weight * prior) / (reached + self.prior_weight)
            out.append(prior)
        return out

    @property
    def geometric(self) -> float:
        """One acceptance for all positions (the geometric estimate over the same rounds)."""
        return acceptance_estimate(self.tokens, self.rounds, self.prior, self.prior_weight)

    def expected(self, window: int, scale: float = 1.0, conditional: Sequence[float] | None = None) -> float:
        """Expected tokens of a round at ``window``, each position's acceptance times ``scale``
        (``conditional``: the curve's ``conditional()``, when the caller has it already)."""
        total, reach = 1.0, 1.0
        p = self.conditional() if conditional is None else conditional
        for i in range(max(0, window)):
            reach *= min(0.98, p[min(i, POSITIONS - 1)] * scale)
            total += reach
        return total


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
    strengths: Sequence[float] = ()  # per feature, times ``strength`` (none: 1 each)
    # > 0: an observation counts as at most this many times the prediction before it (at least
    # 1 ms), so one outlier (a start-up transient) cannot dominate a least-squares fit; a real
    # change is still followed, this factor per observation at most.
    clip: float = 0.0
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
        if self.clip > 0:
            value = min(value, self.clip * max(self.predict(features), 1.0))
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
        strengths = np.asarray(self.strengths or [1.0] * len(prior), dtype=np.float64)
        regulariser = np.diag(self.strength * strengths * scale**2)
        a, b = self._xtx + regulariser, self._xty + regulariser @ prior
        # No cost is negative: a coefficient the solve puts below 0 is held at 0 and the others
        # are solved again without it (clipping it afterwards would leave the others fitted to
        # a negative one: a prior per-token cost far above the drafts' let the intercept go
        # negative, and the clipped fit priced the observed window at three times its time).
        free = np.ones(len(prior), dtype=bool)
        coef = np.zeros(len(prior))
        while free.any():
            coef = np.zeros(len(prior))
            coef[free] = np.linalg.solve(a[np.ix_(free, free)], b[free])
            if (coef >= 0).all():
                break
            free &= coef > 0
        return [max(0.0, float(c)) for c in coef]


@dataclass
class SpeculationControl:
    """Chooses each round's window from the acceptance curve and the measured costs (ms)."""

    verify_prior: Sequence[float] = (30.0, 2.0, 1.0, 0.0)  # a, b (per request), c (per fed token), e (per request per 1000 context rows)
    draft_prior: Sequence[float] = (10.0, 1.0, 1.0)  # d0, d1 (per drafted token), d2 (per token per request drafting at once)
    overhead_prior: float = 10.0  # R: a round's time outside drafting and verification
    # Window-0 rounds decode up to this many tokens in one verifier job (multi-step): their
    # round overhead is paid once for all of them, so that is what drafting must beat.
    multi_step: int = 1
    enabled: bool = True
    decay: float = 0.995  # of the shared acceptance counts, per drafted round
    prior_rounds: float = 4.0  # weight of the shared estimate in a request's own, in rounds
    explore_until: int = 32  # drafted rounds observed before the model alone decides
    explore_every: int = 50  # then one round in this many drafts at its adaptive window
    explore_rounds: int = 2  # a request's first drafted rounds, whatever the model says
    # Exploration, and optimism about a request's acceptance, only while batches are this
    # small: under load a drafted round costs its batch-mates too (even rare exploration cost a
    # large share of the throughput at 16 requests).
    explore_max_batch: int = 2
    optimism: float = 1.0  # standard deviations (optimistic_estimate)
    # Whether the drafters share the verifier's compute (cores of one machine, a GPU): then a
    # cooperating drafter's work is the verifier's time, and cooperation shrinks with the batch
    # (``cooperating``). Drafters with compute of their own draft side by side.
    drafters_share_compute: bool = True
    smoothing: float = 0.05  # of the running means (overhead, batch context)
    verify: LinearCost = field(init=False)
    draft: LinearCost = field(init=False)
    curve: AcceptanceCurve = field(init=False)

    def __post_init__(self) -> None:
        self.verify = LinearCost(self.verify_prior)
        self.draft = LinearCost(self.draft_prior, strengths=DRAFT_PRIOR_STRENGTHS, clip=DRAFT_CLIP)
        self.curve = AcceptanceCurve(decay=self.decay)
        self.overhead_ms = float(self.overhead_prior)
        self.context_rows = 0.0  # running mean of a batch's longest context
        # Running mean of the tokens a round without drafts yields: up to multi_step where one
        # batch holds every request, one where others wait in the pool (no multi-step then).
        self.decode_tokens = float(max(1, self.multi_step))

    # ---- observations --------------------------------------------------------------------

    def observe_verification(self, batch_size: int, fed_tokens: int, ms: float, longest_context: int = 0) -> float:
        """A timed verification batch; returns the prediction's relative error before this
        batch entered the fit (the cost model's error on a batch it was not fitted on)."""
        features = verify_features(batch_size, fed_tokens, longest_context)
        error = abs(self.verify.predict(features) - ms) / max(ms, 1e-6)
        self.verify.observe(features, ms)
        self.context_rows += self.smoothing * (longest_context - self.context_rows)
        return error

    def observe_drafting(self, window: int, ms: float, together: int = 1) -> None:
        """A drafting hop's time at ``window``, with ``together`` requests drafting at once (the
        drafters draft them in one batch: the hop grows with it)."""
        self.draft.observe(draft_features(window, together), ms)

    def observe_overhead(self, ms: float) -> None:
        """A round's wall time less its drafting and its own verification (hops, batch forming,
        other batches ahead of it at the verifier)."""
        self.overhead_ms += self.smoothing * (max(0.0, ms) - self.overhead_ms)

    def observe_decoding(self, tokens: int) -> None:
        """A verified round without drafts yielded ``tokens`` (several: a multi-step job)."""
        self.decode_tokens += self.smoothing * (max(1, tokens) - self.decode_tokens)

    def observe_round(self, depth: int, accepted: int) -> None:
        """A verified round of any request (``depth``: its draft tree's depth; 0 at window 0)."""
        self.curve.observe(depth, accepted)

    # ---- estimates -----------------------------------------------------------------------

    @property
    def acceptance_prior(self) -> float:
        """All requests' recent per-token acceptance (geometric; 0.5 before any drafted round)."""
        return self.curve.geometric

    def acceptance(self, accepted: int, drafted_rounds: int, optimistic: bool = False) -> float:
        """A request's per-token acceptance (geometric), its own rounds on top of the shared
        estimate; ``optimistic``: its upper bound (``optimistic_estimate``)."""
        if optimistic:
            return optimistic_estimate(accepted, drafted_rounds, self.acceptance_prior, self.prior_rounds, self.optimism)
        return acceptance_estimate(accepted, drafted_rounds, self.acceptance_prior, self.prior_rounds)

    def scale(self, accepted: int, drafted_rounds: int, optimistic: bool = False) -> float:
        """How a request's own acceptance compares with everyone's (what the curve is scaled by)."""
        return self.acceptance(accepted, drafted_rounds, optimistic) / max(self.acceptance_prior, 1e-6)

    def expected(self, window: int, accepted: int = 0, drafted_rounds: int = 0) -> float:
        """Expected tokens of a request's round at ``window``: the shared curve, scaled by the
        request's own acceptance against everyone's."""
        return self.curve.expected(window, self.scale(accepted, drafted_rounds))

    def verify_ms(self, batch_size: int, fed_tokens: int, longest_context: float | None = None) -> float:
        context = self.context_rows if longest_context is None else longest_context
        return self.verify.predict(verify_features(batch_size, fed_tokens, context))

    def draft_ms(self, window: int, together: int = 1) -> float:
        return 0.0 if window <= 0 else self.draft.predict(draft_features(window, together))

    def describe(self) -> str:
        a, b, c, e = self.verify.coefficients
        d0, d1, d2 = self.draft.coefficients
        p = ", ".join(f"{x:.2f}" for x in self.curve.conditional()[:4])
        return (f"verify {a:.1f} ms + {b:.2f}/request + {c:.2f}/token + {e:.2f}/request/1000 rows ({self.verify.observations} batches); "
                f"draft {d0:.1f} ms + {d1:.2f}/token + {d2:.2f}/token/request ({self.draft.observations} rounds); round overhead {self.overhead_ms:.1f} ms, {self.decode_tokens:.1f} tokens a round without drafts; "
                f"acceptance by position {p} ({self.curve.rounds:.0f} recent rounds)")

    def decoding_ms(self, batch_size: int) -> float:
        """Time per token of each request of a batch at window 0: one decoding forward, and the
        round overhead shared by the tokens such a round yields (``decode_tokens``: as many as
        multi-step jobs make at this load, measured; one where the pool keeps other requests
        waiting and a job decodes one token)."""
        batch_size = max(1, batch_size)
        return self.overhead_ms / max(1.0, self.decode_tokens) + self.verify_ms(batch_size, batch_size)

    def explore(self, key: str, round_index: int, drafted_rounds: int = 0) -> bool:
        """Whether this round drafts at its adaptive window whatever the model says: until the
        drafting model has ``explore_until`` observations, a request's first ``explore_rounds``
        drafted rounds (its own acceptance), then one round in ``explore_every`` (chosen by a
        hash of the request and round, so every coordinator agrees) — at window 0 the model
        would otherwise never learn that drafting got cheaper or better."""
        if self.draft.observations < self.explore_until or drafted_rounds < self.explore_rounds:
            return True
        digest = hashlib.blake2b(f"{key}:{round_index}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little") % self.explore_every == 0

    def choose(self, limit: int, batch_size: int, accepted: int = 0, drafted_rounds: int = 0) -> int:
        """The window in 0 .. limit with the most expected tokens per ms of round (ties: the
        smaller), for a request in a batch of ``batch_size`` whose batch-mates are alike."""
        if not self.enabled or limit <= 0:
            return max(0, limit)
        if batch_size > 1:  # batch-mates alike: all at the shared estimate, at one window
            return self.plan([(limit, 0, 0)] * batch_size)[0]
        return self.plan([(limit, accepted, drafted_rounds)])[0]

    def cooperating(self, count: int, batch_size: int, window: int = 0) -> int:
        """How many of a request's ``count`` ranked drafters draft its round at ``window`` when
        batches hold ``batch_size`` requests. All while the verifier takes one request at a
        time, fewer as batches grow (the drafting work per verification batch stays about the
        same), at least one. Where the drafters have compute of their own, their chains are
        drafted side by side and cost the round no drafting time: then as many as the verifier
        takes for little more than one chain's forward (``COOPERATION_SLACK``, by the
        verification cost model, each chain ``window`` tokens more for every request of the
        batch) — all of them where a forward's time hardly depends on its tokens (a GPU at
        these batches), no more than the batch rule where it does (a CPU)."""
        if not self.enabled or not count:
            return count
        shared = max(1, count // max(1, batch_size))
        if self.drafters_share_compute or shared == count:
            return shared
        batch = max(1, batch_size)
        one = self.verify_ms(batch, batch * (1 + window))
        chains = count
        while chains > shared and self.verify_ms(batch, batch * (1 + chains * window)) > COOPERATION_SLACK * one:
            chains -= 1
        return chains

    def plan(self, requests: Sequence[tuple[int, int, int]], batch_size: int = 0) -> list[int]:
        """Windows for requests verified together, each ``(limit, accepted, drafted_rounds)``,
        in a batch of ``max(batch_size, len(requests))`` (the others at window 0).

        The batch's round costs ``R + D(w, k) + V(B, T)`` whoever drafts (batch-mates wait for the
        slowest draft), so drafting is decided for the batch: the ``k`` requests with the best
        acceptance draft at window ``w`` (each within its limit), the rest at 0, for the ``k``
        and ``w`` with the most expected tokens per ms; no drafting when none beats decoding
        (``decoding_ms``: multi-step jobs pay the round overhead once for several tokens).

        In batches of at most ``explore_max_batch`` whether to draft at all is decided at the
        requests' optimistic acceptance (``optimistic_estimate``; the window still at their
        estimate): a round at window 0 observes nothing, so a request stopped by a low estimate —
        everyone's early rounds, or its own first two — would never show it wrong; its own
        drafted rounds narrow the bound until they decide."""
        n = len(requests)
        if not self.enabled:
            return [max(0, limit) for limit, _, _ in requests]
        batch = max(batch_size, n, 1)
        scales = [self.scale(accepted, rounds) for _, accepted, rounds in requests]
        order = sorted((i for i in range(n) if requests[i][0] > 0), key=lambda i: -scales[i])
        decoding = batch / max(self.decoding_ms(batch), 1e-6)
        best = (0.0, 0, 0, 0.0)  # the best drafting: (rate, k, w, ms)
        most = max((requests[i][0] for i in order), default=0)
        conditional = self.curve.conditional()  # once per plan: the coordinator's CPU is the verifier's too
        for window in range(1, most + 1):
            tokens, fed = float(batch), batch
            for k, i in enumerate(order, start=1):
                w = min(window, requests[i][0])
                tokens += self.curve.expected(w, scales[i], conditional) - 1
                fed += w
                ms = self.overhead_ms + self.draft_ms(window, k) + self.verify_ms(batch, fed)
                rate = tokens / max(ms, 1e-6)
                if rate > best[0] * (1 + 1e-9):
                    best = (rate, k, window, ms)
        rate, k, window, ms = best
        if k and rate <= decoding * (1 + 1e-9) and batch <= self.explore_max_batch:
            drafted = order[:k]  # the same plan, at the drafting requests' upper bounds
            rate = (batch + sum(self.curve.expected(min(window, requests[i][0]), self.scale(*requests[i][1:], optimistic=True), conditional) - 1
                                for i in drafted)) / max(ms, 1e-6)
        if rate <= decoding * (1 + 1e-9):
            return [0] * n
        drafting = set(order[:k])
        return [min(window, requests[i][0]) if i in drafting else 0 for i in range(n)]
