"""Dead letters: entries a stage could not handle, kept in the stream ``{namespace}dead``.

A record (written by ``dead_letter`` in workers/base.py) has ``stream`` (where the entry came
from), ``entry_id``, ``stage``, ``reason`` and ``fields``: the entry's internal msgpack payload
(its ``m`` field, cut at 64 KiB), or, for an entry without one (client streams, foreign
entries), ``repr()`` of its field dict, cut at 4000 characters. Replaying writes the original
entry back to its stream, where the stage's consumer group reads it as a new entry.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import redis

from cosine.wire import PAYLOAD_FIELD, Keys

PAYLOAD_LIMIT = 65536  # dead_letter keeps at most this much of a payload
REPR_LIMIT = 4000  # ... and of a field dict's repr()
_REPR_PREFIXES = (b"{b'", b'{b"')  # a dict of bytes; a msgpack map never starts with "{"


class DeadLetterError(Exception):
    """A dead letter that does not exist or cannot be replayed as it was."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str  # the record's id in the dead stream
    stream: str
    entry_id: str
    stage: str
    reason: str
    fields: bytes
    age_s: float

    def to_json(self) -> dict:
        return {
            "id": self.id, "stream": self.stream, "entry_id": self.entry_id, "stage": self.stage,
            "reason": self.reason, "age_s": round(self.age_s, 3), "fields_bytes": len(self.fields),
            "replayable": replay_problem(self.fields) is None,
        }


def list_dead(client: redis.Redis, keys: Keys, count: int = 100) -> list[DeadLetter]:
    """The ``count`` newest dead letters, newest first; ages by the server's clock."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros / 1000
    return [_dead_letter(entry_id, record, now_ms) for entry_id, record in client.xrevrange(keys.dead, count=count)]


def replay(client: redis.Redis, keys: Keys, dead_id: str) -> str:
    """Write a dead letter's original entry back to its stream and delete the dead letter (one
    transaction); returns the new entry's id."""
    found = client.xrange(keys.dead, dead_id, dead_id)
    if not found:
        raise DeadLetterError(f"no dead letter {dead_id!r} in {keys.dead}")
    record = found[0][1]
    stream = _text(record.get(b"stream", b""))
    if not stream.startswith(keys.prefix):
        raise DeadLetterError(f"dead letter {dead_id} names the stream {stream!r}, outside the namespace {keys.prefix!r}")
    fields = original_fields(record.get(b"fields", b""))
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(stream, fields)
        pipe.xdel(keys.dead, dead_id)
        new_id, _ = pipe.execute()
    return _text(new_id)


def original_fields(stored: bytes) -> dict[bytes, bytes]:
    """The entry's fields as they were, from a record's ``fields``; DeadLetterError if they
    cannot be rebuilt exactly."""
    problem = replay_problem(stored)
    if problem:
        raise DeadLetterError(problem)
    if stored.startswith(_REPR_PREFIXES):
        return ast.literal_eval(stored.decode())
    return {PAYLOAD_FIELD: stored}


def replay_problem(stored: bytes) -> str | None:
    """Why a record's ``fields`` cannot be replayed faithfully, or None."""
    if not stored:
        return "the dead letter keeps no fields"
    if not stored.startswith(_REPR_PREFIXES):
        if len(stored) >= PAYLOAD_LIMIT:
            return f"the payload was cut at {PAYLOAD_LIMIT} bytes when dead-lettered; it cannot be replayed faithfully"
        return None
    try:
        fields = ast.literal_eval(stored.decode())  # literals only: never evaluates code
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        cut = len(stored) >= REPR_LIMIT
        return (f"the entry's fields were stored as repr() cut at {REPR_LIMIT} characters; they cannot be replayed faithfully"
                if cut else "the entry's fields (stored as repr()) cannot be parsed back")
    if not isinstance(fields, dict) or not fields or not all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in fields.items()):
        return "the entry's fields (stored as repr()) are not a field dict"
    return None


def _dead_letter(entry_id: bytes, record: dict[bytes, bytes], now_ms: float) -> DeadLetter:
    dead_id = _text(entry_id)
    return DeadLetter(
        id=dead_id,
        stream=_text(record.get(b"stream", b"")),
        entry_id=_text(record.get(b"entry_id", b"")),
        stage=_text(record.get(b"stage", b"")),
        reason=_text(record.get(b"reason", b"")),
        fields=record.get(b"fields", b""),
        age_s=max(0.0, (now_ms - int(dead_id.split("-", 1)[0])) / 1000),
    )


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
