"""Statistical tests of verify_sampling: the emitted tokens follow the target, whatever the drafts.

The "models" are Markov chains over a 6-token vocabulary: the target samples x1 ~ p0 and
x_{t+1} ~ P[x_t]; drafter d samples x1 ~ q0_d and x_{t+1} ~ Q_d[x_t]. Every draft distribution
is at least 0.3 from the target's in total variation. Each of N >= 20,000 trials draws every
drafter's 2-token chain, fuses them with merge_chains, verifies with one generator seeded once,
and records the first two emitted tokens (when only one was emitted, the second is drawn from
the target given the first). The joint and the marginal of the first token are compared with
the exact target by a chi-square test and by the largest deviation in frequency.

A verifier that draws the recovered token from the target instead of the residual is run through
the very same check, which must reject it: the check can fail.
"""

from dataclasses import dataclass

import torch
from scipy.stats import chisquare

from cosine.core.acceptance import _draft_row, _residual, _verdict, verify_greedy, verify_sampling
from cosine.core.sampling import SamplingParams, restrict_top_k, warp_probs
from cosine.core.tree import ROOT, DraftChain, DraftTree, fuse_steps, merge_chains
from cosine.wire.convert import probs_from_bytes, probs_to_bytes

N = 20_000
SEED = 1234
ALPHA = 1e-4  # a chi-square p-value below this fails the check
MAX_DEV = 0.015  # ~4 standard deviations of a frequency estimated from 20,000 samples
V = 6


def markov(first: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(p0 [V], P [V, V]) with P[a] = p0 rotated by a: every conditional row is a permutation of p0."""
    p0 = torch.tensor(first, dtype=torch.float64)
    return p0, torch.stack([torch.roll(p0, a) for a in range(V)])


TARGET = markov([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
DRAFT_A = markov([0.05, 0.08, 0.12, 0.20, 0.25, 0.30])  # TV 0.50 from the target
DRAFT_B = markov([0.10, 0.45, 0.05, 0.05, 0.30, 0.05])  # TV 0.42
FIXED = DraftChain((1, 2), (1.0, 1.0), None, "lookup")  # a fixed proposal (draft_probs=None)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_drafts_are_far_from_target():
    for p0, p_rows in [TARGET]:
        for q0, q_rows in [DRAFT_A, DRAFT_B]:
            assert tv(p0, q0) >= 0.3
            assert all(tv(p_rows[a], q_rows[a]) >= 0.3 for a in range(V))


def verify_sampling_broken(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator):
    """verify_sampling with one deliberate bug: on rejection it resamples from the target, not the residual."""
    path: list[int] = []
    node = ROOT
    while True:
        residual = target_probs[node + 1].float()
        chosen = None
        for draw in tree.draws_below(node):
            token = tree.tokens[draw.node]
            draft_probs = _draft_row(tree, draw.probs_row, token, residual)
            if torch.rand((), generator=generator) < residual[token] / draft_probs[token]:
                chosen = draw.node
                break
            residual = _residual(residual, draft_probs)
        if chosen is None:
            token = int(torch.multinomial(target_probs[node + 1].float(), 1, generator=generator).item())  # the bug
            return _verdict(tree, path, token)
        path.append(chosen)
        node = chosen


def verify_sampling_stale_target(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator):
    """Another broken rule, specific to multi-draft: every draw is tested against the target, not
    against the residual left by the draws rejected before it."""
    path: list[int] = []
    node = ROOT
    while True:
        target = residual = target_probs[node + 1].float()
        chosen = None
        for draw in tree.draws_below(node):
            token = tree.tokens[draw.node]
            draft_probs = _draft_row(tree, draw.probs_row, token, residual)
            if torch.rand((), generator=generator) < target[token] / draft_probs[token]:  # the bug
                chosen = draw.node
                break
            residual = _residual(residual, draft_probs)
        if chosen is None:
            return _verdict(tree, path, int(torch.multinomial(residual, 1, generator=generator).item()))
        path.append(chosen)
        node = chosen


@dataclass
class Check:
    p_first: float
    p_joint: float
    max_dev: float

    @property
    def passed(self) -> bool:
        return self.p_first > ALPHA and self.p_joint > ALPHA and self.max_dev < MAX_DEV


def step_tree(i: int, drawn: list, generator: torch.Generator) -> DraftTree:
    """Step mode for trial i: every drafter's first draw, the most confident one fused, then every
    drafter's second draw after the fused token (drawn now: it depends on the fusion)."""
    first = [DraftChain((x1[i],), (float(q0[x1[i]]),), q0[None], f"d{rank}") for rank, (x1, _, q0, _) in enumerate(drawn)]
    fused = max(first, key=lambda c: c.confidences[0]).tokens[0]
    second = []
    for rank, (_, _, _, q_rows) in enumerate(drawn):
        b = int(torch.multinomial(q_rows[fused], 1, generator=generator))
        second.append(DraftChain((b,), (float(q_rows[fused, b]),), q_rows[fused][None], f"d{rank}"))
    return fuse_steps([first, second])


def check_sampler(verify, drafters, fixed=(), n=N, seed=SEED, fusion="tree", wire=False) -> Check:
    """Run n trials of drafting + verification and compare the first two emitted tokens with the
    target; ``wire``: each chain's distributions cross the wire form (sparse rows) on the way."""
    generator = torch.Generator().manual_seed(seed)
    p0, p_rows = TARGET
    p0_f, p_rows_f = p0.float(), p_rows.float()
    # Each drafter's chains for all trials at once: x1 ~ q0, x2 ~ Q[x1].
    drawn = []
    for q0, q_rows in drafters:
        x1 = torch.multinomial(q0, n, replacement=True, generator=generator)
        x2 = torch.multinomial(q_rows[x1], 1, generator=generator).squeeze(1)
        drawn.append((x1.tolist(), x2.tolist(), q0.float(), q_rows.float()))
    counts = torch.zeros(V, V, dtype=torch.float64)
    for i in range(n):
        if fusion == "step":
            tree = step_tree(i, drawn, generator)
            target_probs = torch.cat([p0_f[None], p_rows_f[list(tree.tokens)]])
            new = verify(tree, target_probs, generator).new_tokens
            second = new[1] if len(new) > 1 else int(torch.multinomial(p_rows_f[new[0]], 1, generator=generator))
            counts[new[0], second] += 1
            continue
        chains = list(fixed)
        for rank, (x1, x2, q0, q_rows) in enumerate(drawn):
            a, b = x1[i], x2[i]
            probs = torch.stack([q0, q_rows[a]])
            if wire:
                probs = torch.from_numpy(probs_from_bytes(probs_to_bytes(probs), V))
            chains.append(DraftChain((a, b), (float(q0[a]), float(q_rows[a, b])), probs, f"d{rank}"))
        tree = merge_chains(chains)
        target_probs = torch.cat([p0_f[None], p_rows_f[list(tree.tokens)]])  # row i + 1: after node i
        new = verify(tree, target_probs, generator).new_tokens
        second = new[1] if len(new) > 1 else int(torch.multinomial(p_rows_f[new[0]], 1, generator=generator))
        counts[new[0], second] += 1
    expected = p0[:, None] * p_rows
    first_counts = counts.sum(1)
    return Check(
        p_first=float(chisquare(first_counts, n * p0).pvalue),
        p_joint=float(chisquare(counts.flatten(), n * expected.flatten()).pvalue),
        max_dev=max(float((first_counts / n - p0).abs().max()), float((counts / n - expected).abs().max())),
    )


def assert_lossless_and_check_can_fail(drafters, fixed=(), fusion="tree", wire=False):
    good = check_sampler(verify_sampling, drafters, fixed, fusion=fusion, wire=wire)
    assert good.passed, good
    bad = check_sampler(verify_sampling_broken, drafters, fixed, fusion=fusion, wire=wire)
    assert not bad.passed, bad
    assert min(bad.p_first, bad.p_joint) < 1e-12, bad  # rejected by a wide margin, not by chance


def test_chain_sampling_matches_target():
    assert_lossless_and_check_can_fail([DRAFT_A])


def test_tree_sampling_matches_target():
    assert_lossless_and_check_can_fail([DRAFT_A, DRAFT_B])


def test_step_fusion_sampling_matches_target():
    # Two drafters, each step's most confident draw continued by both: the step tree's sampled
    # output follows the target, and the broken verifier is caught on the same trees.
    assert_lossless_and_check_can_fail([DRAFT_A, DRAFT_B], fusion="step")


def cut(drafter, k: int = 3):
    """A drafter whose every distribution is cut to its k most likely tokens (as DRAFT_SUPPORT)."""
    q0, q_rows = drafter
    return restrict_top_k(q0, k), torch.stack([restrict_top_k(row, k) for row in q_rows])


def test_cut_distributions_through_the_wire_match_target():
    # The sparse form drafters send: draws from distributions cut to half the vocabulary (zero
    # probability on tokens the target likes), the rows through their wire encoding, fused
    # into a tree with a fixed proposal.
    drafters = [cut(DRAFT_A), cut(DRAFT_B)]
    assert all(int((q0 > 0).sum()) == 3 for q0, _ in drafters)
    assert_lossless_and_check_can_fail(drafters, fixed=[FIXED], wire=True)


def test_tree_with_fixed_proposal_matches_target():
    assert_lossless_and_check_can_fail([DRAFT_A], fixed=[FIXED])


def test_tree_check_rejects_stale_target_rule():
    bad = check_sampler(verify_sampling_stale_target, [DRAFT_A, DRAFT_B])
    assert not bad.passed and bad.p_joint < 1e-12, bad


def test_draft_identical_to_target_always_accepted():
    p0, p_rows = (t.float() for t in TARGET)
    generator = torch.Generator().manual_seed(7)
    for _ in range(500):
        a = int(torch.multinomial(p0, 1, generator=generator))
        b = int(torch.multinomial(p_rows[a], 1, generator=generator))
        tree = merge_chains([DraftChain((a, b), (float(p0[a]), float(p_rows[a, b])), torch.stack([p0, p_rows[a]]))])
        verdict = verify_sampling(tree, torch.cat([p0[None], p_rows[list(tree.tokens)]]), generator)
        assert verdict.accepted_tokens == (a, b)  # ratio p/q = 1: always accepted


def test_temperature_zero_sampling_equals_greedy():
    # With warped (one-hot) target probabilities, rejection sampling reduces to verify_greedy.
    generator = torch.Generator().manual_seed(11)
    greedy = SamplingParams(temperature=0.0)
    for _ in range(200):
        chains = []
        for rank in range(2):
            tokens = torch.randint(0, V, (3,), generator=generator).tolist()
            probs = torch.rand(3, V, generator=generator) + 0.1
            probs /= probs.sum(-1, keepdim=True)
            chains.append(DraftChain(tuple(tokens), (0.5,) * 3, probs if rank == 0 else None, f"d{rank}"))
        tree = merge_chains(chains)
        logits = torch.randn(len(tree) + 1, V, generator=generator)
        logits[0, chains[0].tokens[0]] += 2.0  # make acceptance of the first level common
        target_probs = warp_probs(logits, greedy)
        sampled = verify_sampling(tree, target_probs, generator)
        assert sampled == verify_greedy(tree, logits.argmax(-1))
        last_row = sampled.accepted_nodes[-1] + 1 if sampled.accepted_nodes else 0
        assert sampled.next_token == int(logits[last_row].argmax())
