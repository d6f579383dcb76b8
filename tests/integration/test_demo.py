"""The demo's reader against a real server (no model)."""

from __future__ import annotations

import threading
import time

import redis

from cosine.client import Client
from cosine.demo import _ask


def test_an_answer_after_a_quiet_spell_longer_than_the_socket_timeout_is_read(embedded_url):
    """Regression: the demo blocked 120 s in one XREAD on a connection whose socket time-out is
    5 s (redis-py's default), so any gap over 5 s between output entries raised TimeoutError."""
    writer = redis.Redis.from_url(embedded_url)
    quiet_s = writer.connection_pool.connection_kwargs.get("socket_timeout") or 5
    assert quiet_s < 10

    def answer():
        time.sleep(quiet_s + 1.0)
        writer.xadd("cosine:out:slow", {"type": "final", "text": "done", "token_ids": "[]", "finish_reason": "stop"})

    thread = threading.Thread(target=answer)
    thread.start()
    with Client(embedded_url, timeout=30) as client:
        final = _ask(client, "slow", "a prompt", 4)
    thread.join()
    assert final.text == "done" and final.finish_reason == "stop"
    assert writer.xlen("cosine:requests") == 1
