"""Coordinator: request pool, verification batches, applying verified rounds, next rounds.

- ``candidates`` -> pool -> ``verify``: fused trees wait in a pool until the batch policy
  releases a batch; the batch is written and its candidates acknowledged in one transaction.
  Requests pinned to a target fingerprint (every round after the first) go to that target's
  own verify stream, so a batch never mixes targets.
- ``verified`` -> request state + ``out:{id}`` + next round: each result is applied with the
  compare-and-set Lua function (round number), so duplicates and rival coordinators change
  nothing; the window is retuned from what was accepted; the next round goes to the experts'
  draft queues, or straight to verification with an empty draft (window 0: the target alone)
  when no drafter of those experts is alive or the window is 0. A pending cancellation wins.
- sweeps: a round with no candidate after ``drafter_deadline_ms`` goes on without drafts; a
  request past its deadline ends with ``error_code=deadline``.
- housekeeping: trims streams below what is still pending or unread.
"""

from .worker import Coordinator

__all__ = ["Coordinator"]
