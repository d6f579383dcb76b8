"""Routing profiles: the token counts a drafter was trained on (``profile.safetensors`` in its
directory), read into the router's cold-start classifier.

Read with safetensors' NumPy loader: the router uses this and never loads torch."""

from __future__ import annotations

from pathlib import Path

from safetensors.numpy import load_file

PROFILE_FILE = "profile.safetensors"


def load_profile(path: Path) -> dict[int, int] | None:
    """A drafter directory's routing profile (token id -> count), or None when it has none."""
    file = Path(path) / PROFILE_FILE
    if not file.is_file():
        return None
    stored = load_file(str(file))
    return dict(zip(stored["ids"].tolist(), stored["counts"].tolist()))


def profile_classifier(drafters, vocab_size: int, key=lambda spec: spec.name):
    """The cold-start routing classifier over the configured drafters that carry a routing
    profile, summed per ``key(spec)`` (drafter name for the local engine, expert for the
    pipeline's router); None when none does."""
    from cosine.policy.routing import PromptClassifier

    profiles: dict[str, dict[int, int]] = {}
    for spec in drafters:
        if spec.kind in ("small", "feature"):
            for token, count in (load_profile(spec.resolved_path) or {}).items():
                mine = profiles.setdefault(key(spec), {})
                mine[token] = mine.get(token, 0) + count
    return PromptClassifier(profiles, vocab_size) if profiles else None
