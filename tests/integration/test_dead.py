"""Dead letters on a real server: listed, replayed to their stream, gone from the dead stream."""

from __future__ import annotations

import json

import pytest
import redis
from typer.testing import CliRunner

from cosine.cli import app
from cosine.dead import REPR_LIMIT, DeadLetterError, list_dead, original_fields, replay
from cosine.wire import PAYLOAD_FIELD, Keys

KEYS = Keys("cosine:")


@pytest.fixture()
def url(embedded_url):
    return embedded_url


@pytest.fixture()
def client(url):
    with redis.Redis.from_url(url) as client:
        yield client


def dead_letter(client: redis.Redis, stream: str, fields: dict, stage: str, reason: str) -> str:
    """An entry read from ``stream`` and dead-lettered the way workers/base.py does it."""
    entry_id = client.xadd(stream, fields)
    _, stored = client.xrange(stream, entry_id, entry_id)[0]  # bytes -> bytes, as a worker reads it
    client.xdel(stream, entry_id)
    raw = stored.get(PAYLOAD_FIELD)
    record = {
        "stream": stream,
        "entry_id": entry_id,
        "stage": stage,
        "reason": reason,
        "fields": repr(stored)[:4000] if raw is None else raw[:65536],
    }
    return client.xadd(KEYS.dead, record).decode()


def cli(url: str, *args: str):
    return CliRunner().invoke(app, [*args, "--redis-url", url], catch_exceptions=False)


def test_internal_payload_is_listed_and_replayed(url, client):
    payload = b"\x82\xa1v\x01\xa4body\xc4\x03abc"  # any bytes: replay must not need to decode them
    dead_id = dead_letter(client, KEYS.verify, {"m": payload}, "verifier", "internal error: boom")

    listed = json.loads(cli(url, "dead", "list", "--json").stdout)
    assert [(d["id"], d["stream"], d["stage"], d["reason"], d["replayable"]) for d in listed] == [
        (dead_id, KEYS.verify, "verifier", "internal error: boom", True)
    ]
    assert 0 <= listed[0]["age_s"] < 60

    result = cli(url, "dead", "replay", dead_id)
    assert result.exit_code == 0, result.output
    assert [fields for _, fields in client.xrange(KEYS.verify)] == [{b"m": payload}]
    assert client.xlen(KEYS.dead) == 0


def test_client_entry_is_replayed_with_its_fields(client):
    fields = {"id": "r1", "prompt": "It's \"quoted\" \n and ünïcode", "max_tokens": "8"}
    dead_id = dead_letter(client, KEYS.requests, fields, "router", "internal error: boom")

    replay(client, KEYS, dead_id)

    [(_, replayed)] = client.xrange(KEYS.requests)
    assert replayed == {k.encode(): v.encode() for k, v in fields.items()}
    assert client.xlen(KEYS.dead) == 0


def test_text_listing_shows_id_stage_stream_and_reason(url, client):
    dead_id = dead_letter(client, KEYS.drafts, {"m": b"\x90"}, "fusion", "bad schema version")
    output = cli(url, "dead", "list").output
    assert dead_id in output and "fusion" in output and KEYS.drafts in output and "bad schema version" in output


def test_count_keeps_the_newest(client):
    ids = [dead_letter(client, KEYS.drafts, {"m": bytes([0x90 + i])}, "fusion", f"n{i}") for i in range(3)]
    assert [d.id for d in list_dead(client, KEYS, count=2)] == [ids[2], ids[1]]


def test_truncated_repr_is_refused_and_kept(url, client):
    dead_id = dead_letter(client, KEYS.requests, {"prompt": "x" * (REPR_LIMIT + 10)}, "router", "too big")
    result = cli(url, "dead", "replay", dead_id)
    assert result.exit_code == 1
    assert "cannot be replayed faithfully" in result.output
    assert client.xlen(KEYS.dead) == 1 and client.xlen(KEYS.requests) == 0


def test_unknown_id_is_a_clear_error(url):
    result = cli(url, "dead", "replay", "12345-0")
    assert result.exit_code == 1
    assert "no dead letter '12345-0'" in result.output


def test_a_stream_outside_the_namespace_is_refused(client):
    dead_id = client.xadd(KEYS.dead, {"stream": "other:stream", "entry_id": "1-0", "stage": "x", "reason": "r", "fields": b"\x90"}).decode()
    with pytest.raises(DeadLetterError, match="outside the namespace"):
        replay(client, KEYS, dead_id)


def test_fields_that_are_not_a_field_dict_are_refused():
    with pytest.raises(DeadLetterError, match="not a field dict"):
        original_fields(b"{b'a': 1}")
