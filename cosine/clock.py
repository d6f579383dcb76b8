"""The one clock every decision between processes reads: the Redis server's.

Deadlines, drafting and fusion deadlines, liveness and roster expiry compare times written by
one process with times read by another, on other hosts. Hosts' clocks disagree (seconds, where
NTP is off or slewing), and a process's ``time.time()`` against another's would switch
speculation off or mark live workers dead. The server's ``TIME`` is the one clock they share:
each process keeps its offset to it, measured from a ``TIME`` reply sent along with a call it
makes anyway (the heartbeat) and refreshed with every one, so no round trip is added. Durations
inside a process use ``time.monotonic()`` as before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

MAX_RTT_S = 0.25  # a reply slower than this says little about when the server read its clock


class ServerClock:
    """The server's time as seen from this process: ``time.time()`` plus the measured offset."""

    def __init__(self) -> None:
        self.offset_s = 0.0
        self.rtt_s = float("inf")  # of the sample the offset comes from
        self.synced = False

    def now(self) -> float:
        """Seconds since the epoch by the server's clock."""
        return time.time() + self.offset_s

    def now_ms(self) -> int:
        return int((time.time() + self.offset_s) * 1000)

    def observe(self, sent: float, received: float, reply: Sequence[int]) -> None:
        """A ``TIME`` reply (seconds, microseconds) to a call sent at ``sent`` and answered at
        ``received`` (this process's ``time.time()``): the server read its clock in between."""
        rtt = received - sent
        if rtt < 0 or (self.synced and rtt > max(MAX_RTT_S, 2 * self.rtt_s)):
            return  # a stalled reply (or this host's clock stepped meanwhile): keep the last offset
        self.offset_s = int(reply[0]) + int(reply[1]) / 1e6 - (sent + received) / 2
        self.rtt_s, self.synced = rtt, True

    async def sync(self, client) -> None:
        """Measure the offset now (one ``TIME`` call): at start, before the first heartbeat."""
        sent = time.time()
        reply = await client.time()
        self.observe(sent, time.time(), reply)
