"""Choosing the experts whose drafters draft for a request (first version: rules).

A pinned expert wins. Otherwise the configured default experts, plus any expert one of whose
keywords appears in the prompt, are kept in that order, restricted to experts that have a
drafter, and capped at ``max_experts``. Online routing scores (roadmap) will reorder this list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def choose_experts(
    text: str,
    pinned: str | None,
    default_experts: Sequence[str],
    keywords: Mapping[str, Sequence[str]],
    available: Sequence[str],
    max_experts: int,
) -> list[str]:
    if pinned is not None:
        return [pinned]
    lowered = text.lower()
    matched = [expert for expert, words in keywords.items() if any(w.lower() in lowered for w in words)]
    chosen: list[str] = []
    for expert in [*matched, *default_experts]:
        if expert in available and expert not in chosen:
            chosen.append(expert)
    if not chosen and available:
        chosen = [available[0]]
    return chosen[:max_experts]
