"""Tenants on a real server: what one tenant's user can do to another's requests (nothing), its
bounds, fair starts among tenants, and a pipeline serving one tenant while another attacks."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from cosine import bus
from cosine.client import Client
from cosine.config import Config, PipelineConfig
from cosine.embedded import EmbeddedRedis
from cosine.tenants import TenantBounds, add_tenant, registered, remove_tenant, tenant_rows, user_name, user_url
from cosine.wire import Keys
from cosine.wire.keys import qualify
from tests.conftest import cache_dir
from tests.integration.harness import Pipeline, write_config

KEYS = Keys()
MAX_ID = "18446744073709551615-18446744073709551615"


@pytest.fixture()
def server():
    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    bus.setup_library(url)
    yield url
    embedded.stop()


def last(pieces) -> dict[str, str]:
    """The final entry's fields of a request read with ``Client.read``."""
    pieces = list(pieces)
    assert pieces and pieces[-1].type == "final" and all(p.type == "tokens" for p in pieces[:-1]), pieces
    return pieces[-1].fields


def tenant_client(url: str, name: str, bounds: TenantBounds = TenantBounds()) -> tuple[str, redis.Redis]:
    password = add_tenant(redis.Redis.from_url(url), "cosine:", name, bounds)
    tenant_url = user_url(url, user_name(name), password)
    return tenant_url, redis.Redis.from_url(tenant_url)


def test_the_tenant_commands(server, tmp_path):
    """`cosine tenant add` makes a tenant whose URL (in a 0600 file, or printed once) submits on
    its own stream; `list` shows it with its bounds; `remove` removes it; a bad name is refused."""
    import json
    import os
    import subprocess
    import sys

    from tests.integration.harness import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("COSINE_")} | {"COSINE_REDIS_URL": server}

    def cosine(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cosine.cli", "tenant", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    secret = tmp_path / "acme.url"
    added = cosine("add", "acme", "--max-requests", "3", "--credentials-file", str(secret))
    assert added.returncode == 0 and "cosine-tenant-acme" in added.stdout and "redis://" not in added.stdout, added
    assert os.stat(secret).st_mode & 0o777 == 0o600
    tenant = redis.Redis.from_url(secret.read_text().strip())
    tenant.xadd(KEYS.requests_of("acme"), {"id": "r1"})
    printed = cosine("add", "beta")
    assert printed.returncode == 0 and printed.stdout.strip().splitlines()[-1].startswith("redis://cosine-tenant-beta:")
    rows = {row["tenant"]: row for row in json.loads(cosine("list", "--json").stdout)}
    assert set(rows) == {"default", "acme", "beta"} and rows["acme"]["max_requests"] == 3 and rows["beta"]["max_requests"] > 0
    assert cosine("remove", "acme").stdout.strip() == "tenant acme removed"
    assert cosine("remove", "acme").stdout.strip() == "no tenant acme"
    bad = cosine("add", "Not A Name")
    assert bad.returncode != 0 and "tenant name" in bad.stderr


def test_a_tenant_can_empty_or_block_only_its_own_queue(server):
    """The attacks of a client user on a shared queue (MAXLEN 0 deleted every other client's
    unread requests; an entry with the largest ID made every later submission fail), made by
    tenant A: they reach A's own stream only. A cannot write B's or the default tenant's
    streams, nor read B's outputs or any request state."""
    admin = redis.Redis.from_url(server)
    _, a = tenant_client(server, "a")
    _, b = tenant_client(server, "b")
    for n in range(3):
        b.xadd(KEYS.requests_of("b"), {"id": f"b{n}", "prompt": "hi"})
    admin.xadd(KEYS.out(qualify("b", "b0")), {"type": "tokens", "text": "secret"})
    assert registered(admin, "cosine:") == {"a": TenantBounds(), "b": TenantBounds()}

    a.xadd(KEYS.requests_of("a"), {"id": "a0"}, maxlen=0)
    a.xadd(KEYS.requests_of("a"), {"id": "a1"}, id=MAX_ID)
    with pytest.raises(redis.ResponseError):
        a.xadd(KEYS.requests_of("a"), {"id": "a2"})  # A blocked its own queue
    assert admin.xlen(KEYS.requests_of("b")) == 3
    b.xadd(KEYS.requests_of("b"), {"id": "b3", "prompt": "hi"})  # B submits as before
    assert admin.xlen(KEYS.requests_of("b")) == 4

    refused = [
        lambda: a.xadd(KEYS.requests_of("b"), {"id": "x"}, maxlen=0),
        lambda: a.xadd(KEYS.requests, {"id": "x"}),
        lambda: a.xadd(KEYS.cancel_of("b"), {"id": "b0"}),
        lambda: a.xread({KEYS.out(qualify("b", "b0")): "0-0"}),
        lambda: a.xrange(KEYS.out(qualify("b", "b0"))),
        lambda: a.xrange(KEYS.out("b0")),
        lambda: a.hgetall(KEYS.request(qualify("a", "a0"))),
        lambda: a.hgetall(KEYS.tenants),
        lambda: a.xrange(KEYS.requests_of("b")),
        lambda: a.execute_command("FUNCTION", "FLUSH"),
    ]
    for attempt in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    a.xadd(KEYS.cancel_of("a"), {"id": "b0"})  # its own cancel stream: names A's request b0, if any

    assert remove_tenant(admin, "cosine:", "a") and not remove_tenant(admin, "cosine:", "a")
    assert set(registered(admin, "cosine:")) == {"b"} and not admin.exists(KEYS.requests_of("a"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(user_url(server, user_name("a"), "any")).ping()


def test_starts_are_shared_among_tenants(server):
    """While tenant A's burst of 200 waits (4 may run at once), tenant B's 5, sent after the
    burst, start before A's later ones: each start goes to the tenant running fewer. First
    come, first started across tenants made B wait for all 200."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire.state import state_to_fields
    from cosine.workers.router import Router

    config = Config(pipeline=PipelineConfig(max_requests=4, max_waiting=400, admission_kv=False))
    admin = redis.Redis.from_url(server)
    for name in ("a", "b"):
        tenant_client(server, name, TenantBounds(max_requests=300))

    async def scenario() -> tuple[list[str], list[str]]:
        client = redis.asyncio.Redis.from_url(server)
        router = Router(config, server)
        router.redis = client
        await router._read_tenants()
        assert router._limits("a").max_requests == 300

        async def admit(tenant: str, n: int) -> str:
            request_id = qualify(tenant, f"{tenant}{n}")
            entry_id = await client.xadd(KEYS.requests_of(tenant), {"id": f"{tenant}{n}"})
            await client.xreadgroup(router.group, "test", {KEYS.requests_of(tenant): ">"})
            state = state_to_fields(RequestState(request_id, [1, 2], SamplingParams(), 4, (), (2,), ["general"], created_ms=int(time.time() * 1000),
                                                 deadline_ms=2**42))
            return await bus.admit_request(client, KEYS, group=router.group, entry_id=entry_id, request_id=request_id, deadline_ms=2**42,
                                           ttl_s=60, fields=state, job_streams=[KEYS.candidates], payload=b"job", refusal={"type": "final"},
                                           max_requests=4, max_waiting=400, tenant_max=300)

        outcomes = [await admit("a", n) for n in range(200)] + [await admit("b", n) for n in range(5)]
        assert outcomes.count("created") == 4 and outcomes.count("waiting") == 201
        starts: list[str] = []
        for _ in range(12):  # a request ends, the router starts the next
            running = [m.decode() for m in await client.zrange(KEYS.rounds, 0, 0)]
            await bus.apply_rounds(client, [bus.apply_round_call(KEYS, request_id=running[0], expected_round=0, fields={"status": "finished"},
                                                                 out_entries=[], ttl_s=60)])
            before = set(await client.zrange(KEYS.rounds, 0, -1))
            await router._start_waiting()
            starts += sorted(m.decode() for m in set(await client.zrange(KEYS.rounds, 0, -1)) - before)
        rows = {row["tenant"]: row for row in tenant_rows(admin, config)}
        await client.aclose()
        return starts, [f"{rows['a']['waiting']} {rows['b']['waiting']}"]

    starts, waiting = asyncio.run(scenario())
    assert len(starts) == 12
    b_starts = [i for i, request_id in enumerate(starts) if request_id.startswith("{b}")]
    assert len(b_starts) == 5 and max(b_starts) < 10, starts
    a_starts = [request_id for request_id in starts if request_id.startswith("{a}")]
    assert a_starts == [qualify("a", f"a{n}") for n in range(4, 4 + len(a_starts))]  # first come first within A
    assert waiting == [f"{196 - len(a_starts)} 0"]


def test_a_tenants_unread_backlog_and_stream_bytes_are_bounded(server):
    """Past its bound of unread entries, a tenant's oldest unread requests are refused busy
    (without being tokenized) until it is back under; past its bound of bytes, every unread one.
    Another tenant's stream is not touched."""
    from cosine.workers.router import Router

    _, a = tenant_client(server, "a", TenantBounds(max_unread=5))
    _, b = tenant_client(server, "b", TenantBounds(max_stream_mb=1))
    _, c = tenant_client(server, "c")
    for n in range(20):
        a.xadd(KEYS.requests_of("a"), {"id": f"a{n}", "prompt": "hi"})
    for n in range(3):
        b.xadd(KEYS.requests_of("b"), {"id": f"b{n}", "prompt": "x" * 600_000})
    for n in range(20):
        c.xadd(KEYS.requests_of("c"), {"id": f"c{n}", "prompt": "hi"})

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(server)
        router = Router(Config(), server)
        router.redis = client
        await router._read_tenants()
        await router._shed_backlogs()
        await router.write_tally()
        await client.aclose()

    asyncio.run(scenario())
    admin = redis.Redis.from_url(server)
    lag = {t: admin.xinfo_groups(KEYS.requests_of(t))[0]["lag"] for t in "abc"}
    assert lag == {"a": 5, "b": 0, "c": 20}
    for request_id in [qualify("a", f"a{n}") for n in range(15)] + [qualify("b", f"b{n}") for n in range(3)]:
        [(_, final)] = admin.xrange(KEYS.out(request_id))
        assert final[b"error_code"] == b"busy" and b"past its bound" in final[b"error"], (request_id, final)
    assert not admin.exists(KEYS.out(qualify("a", "a15")))
    metrics = admin.hgetall(KEYS.metrics)
    assert float(metrics[b"requests|error_code=busy,finish_reason=error,tenant=a"]) == 15


def test_a_removed_tenant_is_no_data_loss_to_the_router(server, caplog):
    """`cosine tenant remove` deletes the tenant's streams: the router's next read of them fails
    (NOGROUP). It logged that the server had lost its data; now it reads the registry, says the
    tenant was removed, and does not make the removed tenant's streams again."""
    import logging

    from cosine.workers.router import Router

    tenant_client(server, "gone")

    async def scenario() -> list[str]:
        client = redis.asyncio.Redis.from_url(server)
        router = Router(Config(), server)
        router.redis = client
        await router._prepare_server()
        assert KEYS.requests_of("gone") in router.input_streams()
        remove_tenant(redis.Redis.from_url(server), "cosine:", "gone")
        with caplog.at_level(logging.INFO):
            await router._after_data_loss()
        await client.aclose()
        return router.input_streams()

    streams = asyncio.run(scenario())
    assert KEYS.requests_of("gone") not in streams
    assert not redis.Redis.from_url(server).exists(KEYS.requests_of("gone"), KEYS.cancel_of("gone"))
    assert "tenant gone removed" in caplog.text and "lost functions" not in caplog.text


def test_one_tenant_is_served_while_another_attacks_and_floods(tmp_path, server, demo_target, pipelines):
    """A real pipeline: tenant B's requests are served while tenant A empties and blocks its own
    queue, cancels B's ids (on its own cancel stream: they name A's requests), fails to read B's
    outputs, and floods past its bound of 2 requests (refused busy, at once, on A's own
    streams). The default tenant is served as before."""
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source,
                          drafters=[{"name": "prompt-lookup", "kind": "prompt-lookup", "expert": "lookup"}])
    pipeline = Pipeline(server, config)
    pipelines.append(pipeline)
    a_url, a = tenant_client(server, "a", TenantBounds(max_requests=2))
    b_url, _ = tenant_client(server, "b")
    pipeline.start_stages("lookup")
    with Client(b_url, tenant="b") as b_client, Client(a_url, tenant="a") as a_client, Client(server) as default_client:
        b_ids = [b_client.submit(prompt=f"Count: {n}, {n + 1},", max_tokens=12, request_id=f"b{n}") for n in range(3)]
        default_id = default_client.submit(prompt="The colours of the rainbow are", max_tokens=8, request_id="d0")
        for n in range(3):
            a_client.cancel(f"b{n}")
        with pytest.raises(redis.exceptions.NoPermissionError):
            a.xread({KEYS.out(qualify("b", "b0")): "0-0"})
        flood = [a_client.submit(prompt="flood", max_tokens=4, request_id=f"a{n}") for n in range(20)]
        a_finals = [last(a_client.read(request_id, timeout=240)) for request_id in flood]
        finals = {request_id: last(b_client.read(request_id, timeout=240)) for request_id in b_ids}
        # A empties, then blocks, its own queue: B (and the default tenant) go on being served.
        a.xadd(KEYS.requests_of("a"), {"id": "wipe"}, maxlen=0)
        a.xadd(KEYS.requests_of("a"), {"id": "block"}, id=MAX_ID)
        finals["b3"] = b_client.generate(prompt="Count: 3, 4,", max_tokens=12, request_id="b3").to_fields()
        default_final = default_client.generate(prompt="The colours of the rainbow are", max_tokens=8, request_id="d1").to_fields()
        assert last(default_client.read(default_id, timeout=240))["finish_reason"] in ("length", "stop")
    for request_id, final in finals.items():
        assert final["finish_reason"] == "length" and final["generated_tokens"] == "12", (request_id, final)
    assert default_final["finish_reason"] in ("length", "stop")
    busy = [f for f in a_finals if f.get("error_code") == "busy"]
    assert len(busy) >= 18 and "this tenant" in busy[0]["error"], a_finals
    assert sum(1 for f in a_finals if f["finish_reason"] == "length") == 20 - len(busy)
    # B's outputs are B's: nothing under the default tenant's name; A's cancels ended A's ids.
    admin = redis.Redis.from_url(server)
    assert not admin.exists(KEYS.out("b0"))
    assert [f[b"finish_reason"] for _, f in admin.xrange(KEYS.out(qualify("a", "b0")))] == [b"cancelled"]
    metrics = {k.decode(): float(v) for k, v in admin.hgetall(KEYS.metrics).items()}
    assert any(k.startswith("requests|") and "tenant=b" in k and "finish_reason=length" in k for k in metrics), sorted(metrics)
    assert any(k.startswith("requests|") and "tenant=a" in k and "error_code=busy" in k for k in metrics)
