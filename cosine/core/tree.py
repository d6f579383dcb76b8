"""Draft chains, token trees and the tree attention layout.

A chain is what one drafter proposes: ``window`` tokens, each with the drafter's confidence and,
when sampled, the distribution it was drawn from. Several chains from cooperating drafters are
fused into a ``DraftTree``: chains that share a prefix share nodes, so the target verifies each
distinct (prefix, token) once.

Losslessness at temperature > 0 needs every *draw* remembered, not just every node: two drafters
that propose the same token at the same place give one node but two draws, and multi-draft
rejection sampling must try both, in an order fixed before the draws were made (the drafters'
rank). Hence ``DraftTree.draws``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = -1  # parent index of the first drafted tokens: the last committed token


@dataclass(frozen=True, slots=True)
class DraftChain:
    """One drafter's proposal for one request.

    tokens: [k] proposed ids; confidences: [k] the drafter's probability for each token
    (model-free drafters: empirical frequency); draft_probs: [k, vocab] the distributions the
    tokens were sampled from, or None for fixed proposals (greedy drafting, prompt lookup).
    """

    tokens: tuple[int, ...]
    confidences: tuple[float, ...]
    draft_probs: torch.Tensor | None = None
    drafter: str = ""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.confidences):
            raise ValueError("tokens and confidences differ in length")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.tokens):
            raise ValueError("draft_probs needs one row per token")

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, slots=True)
class Draw:
    """One drafter's sampled (or fixed) token at one node.

    node: index of the tree node it proposes; probs_row: row of ``DraftTree.draft_probs`` it was
    drawn from, or None for a fixed proposal.
    """

    node: int
    probs_row: int | None


@dataclass(frozen=True, slots=True)
class DraftTree:
    """A token tree, nodes in topological order (a parent precedes its children).

    tokens: [n]; parents: [n] (ROOT for the first level); confidences: [n] (highest draw);
    sources: [n] drafter names that proposed each node; draws: every draw, in verification
    order; draft_probs: [m, vocab] rows referenced by draws, or None when all are fixed.
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    confidences: tuple[float, ...]
    sources: tuple[tuple[str, ...], ...]
    draws: tuple[Draw, ...]
    draft_probs: torch.Tensor | None = None
    _children: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.parents) == len(self.confidences) == len(self.sources) == n):
            raise ValueError("tree arrays differ in length")
        for index, parent in enumerate(self.parents):
            if not (parent == ROOT or 0 <= parent < index):
                raise ValueError(f"node {index} has parent {parent}: nodes must be in topological order")
        children: dict[int, list[int]] = {ROOT: []}
        for index, parent in enumerate(self.parents):
            children.setdefault(parent, []).append(index)
            children.setdefault(index, [])
        self._children.update(children)

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        return self._children.get(node, [])

    def child_with_token(self, node: int, token: int) -> int | None:
        for child in self.children(node):
            if self.tokens[child] == token:
                return child
        return None

    def draws_below(self, node: int) -> list[Draw]:
        """Draws proposing a child of ``node``, in verification order."""
        return [draw for draw in self.draws if self.parents[draw.node] == node]

    def depths(self) -> list[int]:
        """Depth of each node; the first level has depth 0 (it sits right after the context)."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(0 if parent == ROOT else depths[parent] + 1)
        return depths

    def path_to(self, node: int) -> list[int]:
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    @property
    def is_chain(self) -> bool:
        return all(parent == index - 1 for index, parent in enumerate(self.parents))


def chain_tree(chain: DraftChain) -> DraftTree:
    """A single chain as a (branchless) tree."""
    return merge_chains([chain])


def merge_chains(chains: list[DraftChain], max_nodes: int | None = None) -> DraftTree:
    """Fuse cooperating drafters' chains into one token tree.

    ``chains`` are in rank order (fixed before drafting), which is the order their draws are
    tried at temperature > 0. Shared prefixes become shared nodes. Siblings are ordered by
    confidence (so a greedy walk and a reader see the most confident branch first).

    ``max_nodes`` caps the tree: chains are truncated from the last-ranked one up. Truncating by
    rank and depth, never by a drawn token's own value, keeps sampling lossless (dropping a draw
    because of its value would bias which draws the verifier sees).
    """
    chains = truncate_to_budget(chains, max_nodes)
    nodes = _Nodes()
    for chain in chains:
        parent = ROOT
        for depth in range(len(chain)):
            parent = nodes.draw(parent, chain, depth)
    return nodes.tree(_confidence_order(nodes.parents, nodes.confidences))


def fuse_steps(levels: list[list[DraftChain]]) -> DraftTree:
    """Step-mode fusion (the paper's): ``levels[d]`` holds every cooperating drafter's one-token
    proposal at draft step d, in rank order, each drafted after the fused tokens of steps < d.
    The fused token of a step is the most confident proposal (ties: the higher-ranked drafter);
    the other proposals of that step become its siblings, leaves of the tree.

    Lossless at temperature > 0: every draw of a step is kept (none is dropped for its value) and
    every draw below a node was sampled after that node's prefix, which is what multi-draft
    rejection sampling needs; only which node has children depends on the draws, and the
    verifier reaches those children only through that node.
    """
    nodes = _Nodes()
    parent = ROOT
    for proposals in levels:
        proposals = [c for c in proposals if len(c)]
        if not proposals:
            break
        for chain in proposals:
            nodes.draw(parent, chain, 0)
        parent = nodes.index_of[(parent, fused_token(proposals))]
    return nodes.tree()


def fused_token(proposals: list[DraftChain]) -> int | None:
    """The token step mode continues from: the most confident one-token proposal (rank breaks ties)."""
    proposals = [c for c in proposals if len(c)]
    return max(proposals, key=lambda c: c.confidences[0]).tokens[0] if proposals else None


class _Nodes:
    """A tree as fusion builds it: a draw of a (parent, token) already there adds its drafter to
    the node's sources and keeps the node's highest confidence; every draw is recorded, in the
    order made."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.confidences: list[float] = []
        self.sources: list[list[str]] = []
        self.draws: list[Draw] = []
        self.probs_rows: list[torch.Tensor] = []
        self.index_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def draw(self, parent: int, chain: DraftChain, depth: int) -> int:
        """Add ``chain``'s token at ``depth`` below ``parent``; returns its node."""
        token, confidence = chain.tokens[depth], chain.confidences[depth]
        node = self.index_of.get((parent, token))
        if node is None:
            node = self.index_of[(parent, token)] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.confidences.append(confidence)
            self.sources.append([chain.drafter])
        else:
            self.confidences[node] = max(self.confidences[node], confidence)
            if chain.drafter not in self.sources[node]:
                self.sources[node].append(chain.drafter)
        row = None
        if chain.draft_probs is not None:
            row = len(self.probs_rows)
            self.probs_rows.append(chain.draft_probs[depth])
        self.draws.append(Draw(node, row))
        return node

    def tree(self, order: list[int] | None = None) -> DraftTree:
        """The tree, nodes renumbered in ``order`` (a topological order; default: as added)."""
        order = list(range(len(self.tokens))) if order is None else order
        remap = {old: new for new, old in enumerate(order)}
        remap[ROOT] = ROOT
        return DraftTree(
            tokens=tuple(self.tokens[old] for old in order),
            parents=tuple(remap[self.parents[old]] for old in order),
            confidences=tuple(self.confidences[old] for old in order),
            sources=tuple(tuple(self.sources[old]) for old in order),
            draws=tuple(Draw(remap[d.node], d.probs_row) for d in self.draws),
            draft_probs=_stack(self.probs_rows) if self.probs_rows else None,
        )


def _stack(rows: list):
    """Rows of draft distributions as one [m, vocab] array of their own kind: tensors where
    drafters and the verifier work, NumPy arrays in the fusion stage (which never loads torch)."""
    if isinstance(rows[0], np.ndarray):
        return np.stack(rows)
    stacked = rows[0].new_empty((len(rows), *rows[0].shape))  # a tensor's own methods: no torch import here
    for i, row in enumerate(rows):
        stacked[i] = row
    return stacked


def truncate_to_budget(chains: list[DraftChain], max_nodes: int | None) -> list[DraftChain]:
    """The chains cut to ``max_nodes`` tokens in all, from the last-ranked one up (by rank and
    depth only: see ``merge_chains``)."""
    if max_nodes is None or sum(len(c) for c in chains) <= max_nodes:
        return chains
    kept: list[DraftChain] = []
    budget = max_nodes
    for chain in chains:
        take = min(len(chain), budget)
        budget -= take
        if take:
            probs = chain.draft_probs[:take] if chain.draft_probs is not None else None
            kept.append(DraftChain(chain.tokens[:take], chain.confidences[:take], probs, chain.drafter))
    return kept


def _confidence_order(parents: list[int], confidences: list[float]) -> list[int]:
    """Pre-order walk with siblings by descending confidence: a topological order."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    order: list[int] = []
    stack = sorted(children.get(ROOT, []), key=lambda n: confidences[n])
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(sorted(children.get(node, []), key=lambda n: confidences[n]))
    return order


def tree_depth(parents: list[int]) -> int:
    """Longest root-to-node path of a candidate tree (parents precede children)."""
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 or parent >= len(depth) else depth[parent] + 1)
    return max(depth, default=0)
