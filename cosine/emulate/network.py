"""An emulated network between a drafter host and Redis: a Redis connection that delays what
it sends and what it receives by half the round trip plus the bytes' time on the wire.

A pipeline of commands is one send and its replies one arrival: only the first reply after a
send waits the half round trip (every reply its bytes). The delay is a sleep on a thread of
its own while the worker's event loop goes on (as on a real link): the loop's own timers round
up to a whole millisecond, more than the delay itself on a fast network. Its overshoot is
recorded ("network"). A delay that woke late is paid back by the process's next delays (each
shortened by what is owed, down to none): single messages jitter by about a thread's wake-up,
the mean delay stays the profile's (a loaded machine's wake-ups run a sub-millisecond delay
40-100% late), and only a machine late by more than the delays themselves shows overshoot.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.asyncio.connection import Connection

from .profiles import NetworkProfile
from .timing import Recorder, sleep_until

_sleepers = ThreadPoolExecutor(max_workers=32, thread_name_prefix="network-delay")  # delays of every connection of the process


def delayed_connection(network: NetworkProfile, slowdown: float = 1.0, recorder: Recorder | None = None) -> type[Connection]:
    """A ``redis.asyncio`` connection class for ``network`` (times scaled by ``slowdown``)."""
    record = recorder or Recorder()
    late = [0.0]  # seconds the delays of this class's connections ran late, not paid back yet

    class DelayedConnection(Connection):
        _owed = False

        async def _delay(self, size: int, whole: bool) -> None:
            delay = slowdown * (network.one_way_s(size) if whole else network.one_way_s(size) - network.rtt_ms / 2000)
            if delay <= 0:
                return
            began = time.perf_counter()
            sleep = delay - min(late[0], delay)  # what earlier delays overshot, paid back
            if sleep > 0:
                # Off the event loop: its timers round up to a whole millisecond, more than the
                # delay itself on a fast network; a thread's sleep wakes within tens of microseconds.
                await asyncio.get_running_loop().run_in_executor(_sleepers, sleep_until, began + sleep)
            actual = time.perf_counter() - began
            late[0] = max(0.0, late[0] + actual - delay)
            record.add("network", delay, actual)

        async def _send_packed_command(self, command) -> None:
            await self._delay(sum(len(part) for part in command), True)
            self._owed = True
            await super()._send_packed_command(command)

        async def read_response(self, *args: Any, **kwargs: Any):
            response = await super().read_response(*args, **kwargs)
            whole, self._owed = self._owed, False
            await self._delay(_size(response), whole)
            return response

    return DelayedConnection


def _size(value: Any) -> int:
    """About the bytes a reply took on the wire."""
    if isinstance(value, (bytes, str)):
        return len(value) + 5
    if isinstance(value, (list, tuple)):
        return 5 + sum(_size(v) for v in value)
    if isinstance(value, dict):
        return 5 + sum(_size(k) + _size(v) for k, v in value.items())
    return 8
