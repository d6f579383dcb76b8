"""Test-only fault points, switched on by ``COSINE_TEST_FAULTS`` (never set in production).

The variable holds ``point=action`` pairs separated by ``;``. Actions:

- ``raise:TEXT``: raise ``InjectedFault`` when the key passed at the point contains TEXT
  (a poison request: ``verifier.forward=raise:poison``);
- ``sleep:SECONDS``: wait there, to widen a window a chaos test aims its kills at
  (``coordinator.after_apply=sleep:0.3``).

Points: ``verifier.forward`` (key: the request id, inside the model call),
``coordinator.apply`` (key: each request id of a verified batch, before it is applied: a result
that cannot be applied) and ``coordinator.after_apply`` (between applying a round and
acknowledging its result).
"""

from __future__ import annotations

import os

ENV = "COSINE_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by a ``raise:`` fault point."""


def _parse(spec: str) -> dict[str, tuple[str, str]]:
    points = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        point, _, action = part.partition("=")
        kind, _, argument = action.partition(":")
        if kind not in ("raise", "sleep"):
            raise ValueError(f"{ENV}: unknown action {action!r} at {point!r}")
        points[point.strip()] = (kind, argument)
    return points


_POINTS = _parse(os.environ.get(ENV, ""))


def enabled() -> bool:
    return bool(_POINTS)


def check(point: str, key: str = "") -> None:
    """Raise at ``point`` when a ``raise:`` fault matches ``key``."""
    kind, argument = _POINTS.get(point, ("", ""))
    if kind == "raise" and argument in key:
        raise InjectedFault(f"injected fault at {point} for {key!r}")


def delay(point: str) -> float:
    """Seconds a ``sleep:`` fault asks for at ``point`` (0 when none)."""
    kind, argument = _POINTS.get(point, ("", ""))
    return float(argument) if kind == "sleep" else 0.0
