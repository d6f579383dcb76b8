"""Sleeping to a profiled deadline, and the record of how far each sleep overshot."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FLUSH_INTERVAL_S = 1.0


@dataclass
class Tally:
    calls: int = 0
    profiled_s: float = 0.0
    actual_s: float = 0.0
    worst_s: float = 0.0  # largest overshoot of one call

    def add(self, profiled_s: float, actual_s: float) -> None:
        self.calls += 1
        self.profiled_s += profiled_s
        self.actual_s += actual_s
        self.worst_s = max(self.worst_s, actual_s - profiled_s)


@dataclass
class Recorder:
    """Overshoot (actual - profiled time) of every emulated call, by kind ("target", "drafter",
    "network"); written as JSON to ``directory`` (when one is set) every second by a thread of
    its own, one file per process and name."""

    directory: str = ""
    name: str = "emulated"
    tallies: dict[str, Tally] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _writer: threading.Thread | None = field(default=None, repr=False)

    def add(self, kind: str, profiled_s: float, actual_s: float) -> None:
        with self._lock:
            self.tallies.setdefault(kind, Tally()).add(profiled_s, actual_s)
            if self.directory and self._writer is None:  # written from a thread of its own, calls or not
                self._writer = threading.Thread(target=self._write_on, name=f"record-{self.name}", daemon=True)
                self._writer.start()

    def _write_on(self) -> None:
        """Every FLUSH_INTERVAL_S: a reader a second after some calls sees them all (a record
        written only on the next call would bring earlier calls into a later reading)."""
        while True:
            self.flush()
            time.sleep(FLUSH_INTERVAL_S)

    def flush(self) -> None:
        if not self.directory:
            return
        with self._lock:
            data = {kind: vars(t).copy() for kind, t in self.tallies.items()}
        path = Path(self.directory) / f"{self.name}-{os.getpid()}.json"
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            temporary.write_text(json.dumps(data))
            temporary.replace(path)
        except OSError:  # a record lost is not a reason to fail a forward
            pass


def sleep_until(deadline: float) -> None:
    """Block this thread until ``time.perf_counter()`` reaches ``deadline`` (no spinning)."""
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


def read_records(directory: str | Path) -> dict[str, Tally]:
    """Every process's record in ``directory``, summed by kind."""
    total: dict[str, Tally] = {}
    for path in Path(directory).glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for kind, values in data.items():
            tally = total.setdefault(kind, Tally())
            tally.calls += values["calls"]
            tally.profiled_s += values["profiled_s"]
            tally.actual_s += values["actual_s"]
            tally.worst_s = max(tally.worst_s, values["worst_s"])
    return total
