"""What a coordinator remembers of each request between its rounds (pure: no I/O).

Nothing here is needed for correctness: any coordinator continues any request from its Redis
state alone. The record serves speed (which verifier and drafters hold its caches, its text so
far, the window planned with its batch-mates) and measurement (its round's timeline). One
bounded record per request: the least recently touched is forgotten first (requests that ended
on another coordinator), and a request's record goes when it ends here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field

from cosine.core.rounds import RequestState

TRACKED = 4096  # requests (and batches) remembered; the least recently touched go first


@dataclass(slots=True)
class RoundClock:
    """One round of a request as this coordinator saw it (monotonic seconds)."""

    round: int
    began: float  # next round asked for (drafting jobs or the direct candidate written)
    pooled: float = 0.0  # its candidate pooled
    sent: float = 0.0  # its batch written to a verify stream
    drafting_ms: float = 0.0  # began -> pooled, when it drafted


@dataclass(frozen=True, slots=True)
class Drafting:
    """A round sent to the drafters and not back yet."""

    round: int
    sent: float  # monotonic seconds
    window: int
    together: int  # requests drafting at once with it


@dataclass(slots=True)
class RequestRecord:
    clock: RoundClock | None = None  # its current round's timeline
    planned: tuple[int, int, int] | None = None  # (round, window, drafting at once) planned with its batch-mates
    text: tuple[int, tuple[int, ...], str] | None = None  # its output's length, last tokens and text (``advance``'s cache)
    home: str = ""  # the verifier instance that verified its last round (holds its caches)
    # prompt positions the verifier holds after its last prefill chunk (-1: a chunk made no
    # progress, e.g. the cache was evicted meanwhile: the rest goes at once)
    prefilled: int = 0
    last_output_ms: int | None = None  # server ms of its last output applied here (inter-token latency)
    draft_homes: dict[str, str] = field(default_factory=dict)  # expert -> the drafter instance that drafted its last round
    # Its state as this coordinator's last apply left it: the next round's state without reading
    # the request's hash (the apply's compare-and-set on round, status and cancellation checks
    # that it still is the request's); None where another process may have changed it since.
    state: RequestState | None = None


class Records:
    """Request id -> its record, at most ``bound`` of them, and the index of rounds drafting."""

    def __init__(self, bound: int = TRACKED) -> None:
        self.bound = bound
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()
        self.drafting: dict[str, Drafting] = {}  # request -> its round with the drafters
        self.texts = _Texts(self)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def of(self, request_id: str) -> RequestRecord:
        """The request's record (made if new), now the most recently touched."""
        record = self._records.get(request_id)
        if record is None:
            record = self._records[request_id] = RequestRecord()
            while len(self._records) > self.bound:
                self.forget(next(iter(self._records)))
        else:
            self._records.move_to_end(request_id)
        return record

    def forget(self, request_id: str) -> None:
        self._records.pop(request_id, None)
        self.drafting.pop(request_id, None)

    def expire_drafting(self, sent_before: float) -> None:
        """Rounds sent to the drafters before ``sent_before`` never came back here: not drafting."""
        self.drafting = {k: d for k, d in self.drafting.items() if d.sent >= sent_before}


class _Texts(MutableMapping):
    """The records' texts as the mapping ``advance`` keeps its text cache in."""

    def __init__(self, records: Records) -> None:
        self.records = records

    def __getitem__(self, request_id: str) -> tuple[int, tuple[int, ...], str]:
        record = self.records.get(request_id)
        if record is None or record.text is None:
            raise KeyError(request_id)
        return record.text

    def __setitem__(self, request_id: str, text: tuple[int, tuple[int, ...], str]) -> None:
        self.records.of(request_id).text = text

    def __delitem__(self, request_id: str) -> None:
        record = self.records.get(request_id)
        if record is None or record.text is None:
            raise KeyError(request_id)
        record.text = None

    def __iter__(self) -> Iterator[str]:
        return (k for k, r in list(self.records._records.items()) if r.text is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)
