"""The HTTP gateway against a real ``cosine serve --http-port`` (embedded server, real workers,
the demo target), with the official ``openai`` package as the client, raw HTTP for the
stream's shape, and a second ``cosine gateway`` process with an API key."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import redis
import torch

from cosine.config import DEMO_TARGET_FILE
from tests.conftest import cache_dir
from tests.integration.harness import ROOT
from tests.integration.test_serve import Served, cmdline, wait_for

MODEL = "SmolLM2-135M-Instruct"
TEXTS = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())


# ---- the gateway alone, on a real server without workers --------------------------------------


def test_without_workers_the_gateway_is_healthy_not_ready_and_checks_keys_and_bodies():
    from starlette.testclient import TestClient

    from cosine.config import load_config
    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import Gateway, GatewaySettings

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        gateway = Gateway(load_config(None, environ={}), url, GatewaySettings((MODEL,), api_keys=("k1", "k2")))
        with TestClient(gateway.app()) as http:
            assert http.get("/health").json() == {"status": "ok"}
            not_ready = http.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["missing"] == ["router", "coordinator", "verifier"]
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
            assert http.post("/v1/chat/completions", json=body).status_code == 401
            assert http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k3"}).status_code == 401
            auth = {"Authorization": "Bearer k2"}
            assert http.get("/v1/models", headers=auth).json()["data"][0]["id"] == MODEL
            bad = http.post("/v1/chat/completions", content=b"{not json", headers=auth)
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
            # Regression: JSON nested past the parser's recursion limit was a 500 (RecursionError).
            deep = http.post("/v1/chat/completions", content=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=auth)
            assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json", deep.text
            bad = http.post("/v1/chat/completions", json={**body, "top_p": 7}, headers=auth)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
            huge = http.post("/v1/completions", content=b'{"model": "x", "prompt": "' + b"a" * 1_400_000 + b'"}', headers=auth)
            assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
            # Nothing was submitted for refused requests.
            assert redis.Redis.from_url(url).exists("cosine:requests") == 0
    finally:
        embedded.stop()


def test_metrics_can_need_a_key_and_read_redis_at_most_once_a_second():
    """/metrics behind a key of its own; scraped 50 times in a row, it reads Redis once (the
    commands the server counts), and a counter written since shows up a second later."""
    from starlette.testclient import TestClient

    from cosine.config import load_config
    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import Gateway, GatewaySettings

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        gateway = Gateway(load_config(None, environ={}), url, GatewaySettings((MODEL,), api_keys=("k1",), metrics_keys=("m1",)))
        store = redis.Redis.from_url(url)
        with TestClient(gateway.app()) as http:
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 401  # an API key is not a metrics key
            metrics = {"Authorization": "Bearer m1"}
            assert http.get("/metrics", headers=metrics).status_code == 200
            store.config_resetstat()
            bodies = {http.get("/metrics", headers=metrics).text for _ in range(50)}
            calls = {k: v["calls"] for k, v in store.info("commandstats").items() if k != "cmdstat_config"}
            assert len(bodies) == 1 and calls.get("cmdstat_hgetall", 0) <= 3 + 5, calls  # one read: 3 hashes + 5 rosters
            store.hincrby("cosine:restarts", "verifier", 1)
            time.sleep(1.1)
            assert http.get("/metrics", headers=metrics).text != bodies.pop()
    finally:
        embedded.stop()


def test_api_keys_map_to_tenants_and_the_keys_file_is_read_again_when_it_changes(tmp_path):
    """A key of the keys file's `KEY TENANT` lines submits on its tenant's stream (and reads its
    tenant's outputs, cancels on its tenant's cancel stream); the file, changed, is in force
    within a second without a restart; a file that no longer parses keeps the keys in force."""
    from starlette.testclient import TestClient

    from cosine.config import load_config
    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import KEYS_FILE_CHECK_S, Gateway, GatewaySettings

    keys_file = tmp_path / "keys"
    keys_file.write_text("k-default\nk-acme acme\n")
    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        store = redis.Redis.from_url(url)
        gateway = Gateway(load_config(None, environ={}), url, GatewaySettings((MODEL,), api_keys_file=keys_file, answer_timeout_s=0.5))
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        with TestClient(gateway.app()) as http:
            acme = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-acme"})
            assert acme.status_code == 504  # nobody answers here
            [(_, fields)] = store.xrange("cosine:t:acme:requests")
            assert fields[b"id"] == acme.headers["x-request-id"].encode() and not store.exists("cosine:requests")
            assert [f[b"id"] for _, f in store.xrange("cosine:t:acme:cancel")] == [fields[b"id"]]
            assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-default"}).status_code == 504
            assert store.xlen("cosine:requests") == 1
            assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-new"}).status_code == 401
            keys_file.write_text("k-new beta\n")
            time.sleep(KEYS_FILE_CHECK_S + 0.1)
            assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-new"}).status_code == 504
            assert store.xlen("cosine:t:beta:requests") == 1
            assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-acme"}).status_code == 401  # revoked
            keys_file.write_text("k-new Bad Tenant Line\n")
            time.sleep(KEYS_FILE_CHECK_S + 0.1)
            assert http.get("/v1/models", headers={"Authorization": "Bearer k-new"}).status_code == 200  # the keys in force stay
    finally:
        embedded.stop()


def test_the_gateway_acl_user_can_do_what_the_gateway_does():
    """As the ACL user of cosine.acl.gateway_rules: health, readiness, metrics, a submitted
    request (with its reader's wake entry) that nobody answers (a 504 after the answer
    time-out, then its cancellation) — and no permission error on the way."""
    from starlette.testclient import TestClient

    from cosine.acl import acl_setuser_rules, gateway_rules
    from cosine.config import load_config
    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import Gateway, GatewaySettings

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "gw", *acl_setuser_rules("gw-secret", gateway_rules()))
        gw_url = f"redis://gw:gw-secret@127.0.0.1:{embedded.port}"
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(gw_url).hset("cosine:req:x", "status", "finished")
        gateway = Gateway(load_config(None, environ={}), gw_url, GatewaySettings((MODEL,), answer_timeout_s=1.0))
        with TestClient(gateway.app()) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/ready").status_code == 503 and "redis" not in http.get("/ready").json()
            assert http.get("/metrics").status_code == 200
            reply = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        request_id = reply.headers["x-request-id"]
        assert [f[b"id"] for _, f in admin.xrange("cosine:requests")] == [request_id.encode()]
        assert [f[b"id"] for _, f in admin.xrange("cosine:cancel")] == [request_id.encode()]
    finally:
        embedded.stop()


def test_a_stream_that_goes_quiet_after_it_started_ends_with_an_error_event_and_is_cancelled():
    """Regression (review): a stream whose output stopped after its first entry ended with the
    error event and [DONE] but counted as finished, so the request was never cancelled. Here
    the test writes the request's first output entry itself (no workers run) and then nothing."""
    import threading

    from starlette.testclient import TestClient

    from cosine.config import load_config
    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import Gateway, GatewaySettings

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        store = redis.Redis.from_url(url)

        def first_entry() -> None:  # as the pipeline would: one tokens entry, then silence
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                entries = store.xrange("cosine:requests") if store.exists("cosine:requests") else []
                if entries:
                    request_id = entries[0][1][b"id"].decode()
                    store.xadd(f"cosine:out:{request_id}", {"type": "tokens", "text": "Hi", "token_ids": "[1]"}, id="1-0")
                    return
                time.sleep(0.02)

        writer = threading.Thread(target=first_entry)
        writer.start()
        gateway = Gateway(load_config(None, environ={}), url, GatewaySettings((MODEL,), answer_timeout_s=1.0))
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        with TestClient(gateway.app()) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        writer.join()
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "timeout", lines
        assert [f[b"id"] for _, f in store.xrange("cosine:cancel")] == [request_id.encode()]
    finally:
        embedded.stop()


def test_the_output_reader_still_times_requests_out_while_redis_is_gone():
    """Regression (review): while reads failed (the server gone, a permission missing) the
    reader skipped its time-outs, so a client waited for as long as the outage lasted."""
    import asyncio

    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import OutputReader
    from cosine.wire import Keys

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()

    async def scenario() -> None:
        reader = OutputReader(url, Keys(), timeout_s=1.0)
        listener = reader.register("cosine:out:gone")
        await asyncio.sleep(0.3)
        embedded.stop()
        with pytest.raises(TimeoutError, match="no output"):  # the listener's own, not wait_for's
            await asyncio.wait_for(listener.next(), 15)
        await reader.close()

    try:
        asyncio.run(scenario())
    finally:
        embedded.stop()


def test_a_frozen_redis_gets_the_gateway_and_the_client_to_answer_in_their_time():
    """A Redis server that stops answering (SIGSTOP: frozen, not gone) hangs no one: a waiting
    request's answer times out on its own (the reader is blocked on the frozen server), a
    request sent meanwhile gets 504 within the gateway's Redis time-out, and the Python client's
    read raises TimeoutError naming the server within its time-out."""
    import asyncio
    import threading

    from starlette.testclient import TestClient

    from cosine.client import REDIS_TIMEOUT_S, Client
    from cosine.config import load_config
    from cosine.embedded import EmbeddedRedis
    from cosine.gateway import REDIS_TIMEOUT_S as GATEWAY_REDIS_TIMEOUT_S
    from cosine.gateway import Gateway, GatewaySettings, OutputReader
    from cosine.wire import Keys

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    results: dict[str, object] = {}

    def timed(name: str, fn) -> None:  # on a thread: a hang must fail the test, not stall it
        began = time.monotonic()
        try:
            results[name] = fn()
        except Exception as error:
            results[name] = error
        results[name + "_s"] = time.monotonic() - began

    async def reader_scenario() -> object:
        reader = OutputReader(url, Keys(), timeout_s=1.0)
        listener = reader.register("cosine:out:waiting")
        await asyncio.sleep(1.5)  # the reader is blocked in a read when the server freezes
        try:
            return await listener.next()
        finally:
            reader.task.cancel()

    def gateway_post():
        gateway = Gateway(load_config(None, environ={}), url, GatewaySettings((MODEL,), answer_timeout_s=600.0))
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        with TestClient(gateway.app()) as http:
            return http.post("/v1/chat/completions", json=body)

    client = Client(url, timeout=3.0)
    request_id = client.submit(prompt="Hi", max_tokens=4)
    try:
        threads = [threading.Thread(target=timed, args=("reader", lambda: asyncio.run(reader_scenario())), daemon=True)]
        threads[0].start()
        time.sleep(0.5)
        os.kill(embedded.pid, signal.SIGSTOP)
        threads += [threading.Thread(target=timed, args=("gateway", gateway_post), daemon=True),
                    threading.Thread(target=timed, args=("client", lambda: list(client.read(request_id))), daemon=True)]
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        os.kill(embedded.pid, signal.SIGCONT)
        for thread in threads:
            thread.join(30)
        client.close()
        embedded.stop()
    assert isinstance(results["reader"], TimeoutError) and "no output" in str(results["reader"]), results
    assert results["reader_s"] < 1.5 + 1.0 + 1.0, results
    response = results["gateway"]
    assert not isinstance(response, Exception), repr(response)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout", response.text
    assert results["gateway_s"] < GATEWAY_REDIS_TIMEOUT_S * 2 + 5, results  # the app's start (a health read) and the submit
    assert isinstance(results["client"], TimeoutError) and "did not answer" in str(results["client"]), results
    assert results["client_s"] < 3.0 + REDIS_TIMEOUT_S + 1.0, results


# ---- a real `cosine serve --http-port` --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    target = cache_dir() / "models" / DEMO_TARGET_FILE
    if not target.is_file():
        pytest.skip("the demo target is not in the model cache (run `cosine models pull`)")
    port = free_port()
    serve = Served(tmp_path_factory.mktemp("gateway"), str(target), ("--http-port", str(port)))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(base), 240, "the gateway ready", serve)
        yield base, serve
    finally:
        serve.stop()


def greedy_text(demo_target, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    with torch.inference_mode():
        out = demo_target.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    return demo_target.tokenizer.decode(new, skip_special_tokens=True), new


@pytest.mark.model
def test_the_openai_client_gets_the_targets_greedy_output_with_usage(served, demo_target, chat_prompts, greedy_references):
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": TEXTS[0]}]
    expected = demo_target.tokenizer.decode(greedy_references[0][:16], skip_special_tokens=True)

    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(chat_prompts[0]), 16)
    assert reply.id.startswith("chatcmpl-") and reply.system_fingerprint.startswith("fp_")
    statistics = reply.model_extra["cosine"]
    assert statistics["num_verification_rounds"] >= 1 and 0 <= statistics["num_accepted_tokens"] <= statistics["num_draft_tokens"]

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    prompt = "The capital of France is"
    text, _ = greedy_text(demo_target, demo_target.tokenizer(prompt, add_special_tokens=False)["input_ids"], 8)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert completion.choices[0].text == text and completion.usage.completion_tokens == 8
    pieces = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == text


def torch_loaded(pid: int) -> bool:
    """Whether torch's native library is mapped into the process (what importing torch does)."""
    with open(f"/proc/{pid}/maps") as maps:
        return any("libtorch" in line for line in maps)


@pytest.mark.model
def test_the_light_stages_run_without_torch(served):
    """Started as `cosine serve` starts them, after a request went through them: the router,
    coordinator, fusion and gateway processes have not loaded torch (import-linter sees only the
    package's own imports); the verifier, which runs the target, has."""
    base, serve = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TEXTS[1]}], max_tokens=6, temperature=0)
    assert reply.usage.completion_tokens == 6
    pids = {role: serve.worker_pids(role) for role in ("router", "coordinator", "fusion", "verifier")}
    pids["gateway"] = [pid for pid in serve.children() if "cosine.cli gateway" in cmdline(pid)]
    assert all(pids.values()), pids
    assert {role: [torch_loaded(pid) for pid in found] for role, found in pids.items()} == {
        "router": [False], "coordinator": [False], "fusion": [False], "gateway": [False], "verifier": [True]}


@pytest.mark.model
def test_logprobs_through_the_openai_client(served, demo_target):
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": TEXTS[0]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    assert b"".join(bytes(t.bytes) for t in content).decode() == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)

    prompt = "The capital of France is"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=1, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    tokens = [t for part in streamed for t in part.tokens]
    assert len(tokens) == 8 and "".join(tokens) == "".join(c.choices[0].text for c in chunks)
    offsets = [o for part in streamed for o in part.text_offset]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # Greedy: the one alternative asked for is the chosen token itself.
    assert all(top == {t: v} for part in streamed for t, v, top in zip(part.tokens, part.token_logprobs, part.top_logprobs))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
    assert whole.choices[0].logprobs.tokens == tokens
    assert whole.choices[0].logprobs.token_logprobs == pytest.approx([v for part in streamed for v in part.token_logprobs])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, top_logprobs=2)
    assert caught.value.param == "top_logprobs"


@pytest.mark.model
def test_bad_requests_get_400_naming_the_parameter(served):
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi"}]
    for params, param in (({"temperature": 5}, "temperature"), ({"n": 2}, "n"), ({"presence_penalty": 1.0}, "presence_penalty"),
                          ({"max_tokens": 10**6}, "max_tokens"), ({"stop": ["x"] * 40}, "stop")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=messages, **params)
        assert caught.value.param == param, (params, caught.value.body)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=messages)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x" * 300_000)
    assert caught.value.param == "prompt"


def events(response: httpx.Response) -> list:
    found = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


@pytest.mark.model
def test_the_stream_has_the_openai_shape(served):
    base, _ = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": TEXTS[1]}], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        found = events(response)
    assert found[-1] == "[DONE]"
    chunks = found[:-1]
    assert all(c["id"] == request_id and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-2]
    assert content and all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None for c in content)
    assert all(c["usage"] is None for c in chunks[:-1])
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.model
def test_a_client_that_disconnects_cancels_its_request(served):
    base, serve = served
    store = serve.client()
    body = {"model": MODEL, "prompt": ", ".join(str(i) for i in range(1, 40)), "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data: ")
    # The connection is closed: the request ends cancelled, and its rounds stop.
    key = f"cosine:req:{request_id}"
    wait_for(lambda: store.hget(key, "status") == b"finished", 30, "the request ended")
    rounds = store.hget(key, "round")
    final = [f for _, f in store.xrange(f"cosine:out:{request_id}") if f[b"type"] == b"final"]
    assert len(final) == 1 and final[0][b"finish_reason"] == b"cancelled", final
    assert int(final[0][b"generated_tokens"]) < 400
    time.sleep(1.0)
    assert store.hget(key, "round") == rounds
    # Not streaming: a client that gives up waiting cancels too. (Its id is found as the new
    # request state: the requests stream is trimmed once entries are acknowledged.)
    before = set(store.scan_iter(match="cosine:req:cmpl-*"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=1.5))
    wait_for(lambda: set(store.scan_iter(match="cosine:req:cmpl-*")) - before, 30, "the abandoned request's state")
    (key,) = set(store.scan_iter(match="cosine:req:cmpl-*")) - before
    wait_for(lambda: store.hget(key, "status") == b"finished", 30, "the abandoned request ended")
    final = [f for _, f in store.xrange(key.replace(b":req:", b":out:")) if f[b"type"] == b"final"]
    assert final[0][b"finish_reason"] == b"cancelled", final


def start_gateway(serve: Served, tmp_path, *args: str) -> tuple[subprocess.Popen, str, object]:
    """One more `cosine gateway` process on the served pipeline: (process, base URL, log path)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSINE_")}
    env.update(COSINE_REDIS_URL=serve.url(), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "cosine.cli", "gateway", "--port", str(port), "--config", str(serve.config_path), *args]
    log = tmp_path / f"gateway-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


@pytest.mark.model
def test_health_ready_api_keys_and_a_graceful_stop(served, tmp_path):
    base, serve = served
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    workers = httpx.get(f"{base}/ready").json()["workers"]
    assert all(workers[role] >= 1 for role in ("router", "coordinator", "verifier"))
    # A second gateway on the same pipeline, with API keys from a file.
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nsecret-one\nsecret-two\n")
    gateway, other, log = start_gateway(serve, tmp_path, "--api-key-file", str(keys), "--grace-s", "60", "--timing-header")
    try:
        wait_for(lambda: ready(other), 60, "the second gateway")
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
        denied = httpx.post(f"{other}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{other}/v1/completions", json=body).status_code == 401
        assert httpx.get(f"{other}/v1/models").status_code == 401
        allowed = httpx.post(f"{other}/v1/completions", json=body, headers={"Authorization": "Bearer secret-two"}, timeout=60)
        assert allowed.status_code == 200 and allowed.json()["usage"]["completion_tokens"] == 2
        marks = dict(m.strip().split("=") for m in allowed.headers["x-cosine-timing"].split(","))
        assert float(marks["arrived"]) <= float(marks["submitted"]) <= float(marks["first"]) <= time.time() * 1000
        assert "x-cosine-timing" not in httpx.get(f"{base}/v1/models").headers and "x-cosine-timing" not in (
            httpx.post(f"{base}/v1/completions", json=body, timeout=60).headers)  # off unless asked for
        # SIGTERM while a stream is open: the stream finishes, then the gateway exits.
        long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{other}/v1/completions", json=long, headers={"Authorization": "Bearer secret-one"},
                          timeout=120) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            gateway.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert sum(json.loads(line[6:])["choices"][0]["finish_reason"] == "length" for line in rest[:-1]) == 1
        assert gateway.wait(30) in (0, -signal.SIGTERM)  # uvicorn ends by the signal it stopped on, after the drain
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    assert "Traceback" not in log.read_text(errors="replace")


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(response.text) for s in f.samples}


@pytest.mark.model
def test_metrics_from_two_gateways_agree_with_the_final_entries_through_a_verifier_restart(served, tmp_path):
    """Counters are kept by the workers in Redis: any gateway reports the whole pipeline, and
    drafted / accepted tokens per drafter add up to what the requests' final entries say, also
    when a verifier was killed (and restarted by serve) while requests were in flight."""
    import concurrent.futures

    base, serve = served
    gateway, other, _ = start_gateway(serve, tmp_path)
    store = serve.client()
    try:
        wait_for(lambda: ready(other), 60, "the second gateway")
        repeat = "Summarize: the cat sat on the mat. " * 6

        def ask(index: int) -> dict:
            url = (base, other)[index % 2]
            body = {"model": MODEL, "prompt": repeat, "max_tokens": 48, "temperature": 0}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=240).json()

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, i) for i in range(6)]
            time.sleep(1.0)
            for pid in serve.worker_pids("verifier"):
                os.kill(pid, signal.SIGKILL)
            replies = [f.result() for f in futures]
        assert all(r["choices"][0]["finish_reason"] == "length" for r in replies), replies
        wait_for(lambda: int(store.hget("cosine:restarts", "verifier") or 0) >= 1, 60, "the verifier's restart counted")
        # Every request this pipeline ever ended, as its final entry says.
        drafted, accepted, per_drafter = 0, 0, {}
        for key in store.scan_iter(match="cosine:out:*"):
            for _, fields in store.xrange(key):
                if fields[b"type"] != b"final" or fields[b"finish_reason"] == b"error" and fields[b"rounds"] == b"0":
                    continue
                drafted += int(fields[b"draft_tokens"])
                accepted += int(fields[b"accepted_tokens"])
                for name, counts in json.loads(fields[b"drafters"]).items():
                    total = per_drafter.setdefault(name, [0, 0])
                    total[0] += counts["drafted"]
                    total[1] += counts["accepted"]
        assert per_drafter and drafted > 0
        first, second = scrape(base), scrape(other)
        for metrics in (first, second):
            assert metrics[("cosine:spec_decode_num_draft_tokens_total", (("drafter", "all"),))] == drafted
            assert metrics[("cosine:spec_decode_num_accepted_tokens_total", (("drafter", "all"),))] == accepted
            for name, (d, a) in per_drafter.items():
                assert metrics[("cosine:spec_decode_num_draft_tokens_total", (("drafter", name),))] == d
                assert metrics[("cosine:spec_decode_num_accepted_tokens_total", (("drafter", name),))] == a
            assert metrics[("cosine:worker_restarts_total", (("role", "verifier"),))] >= 1
            assert metrics[("cosine:time_to_first_token_seconds_count", ())] > 0
        def counted(metrics):  # counters and histograms (gauges move with the pipeline)
            return {k: v for k, v in metrics.items() if k[0].endswith(("_total", "_bucket", "_sum", "_count"))}

        assert counted(first) == counted(second)
    finally:
        gateway.terminate()
        gateway.wait(30)


@pytest.mark.model
def test_the_status_view_lists_every_live_worker(served):
    import io

    from rich.console import Console

    from cosine.status import ROLES, host_of, read_snapshot, view

    base, serve = served
    body = {"model": MODEL, "prompt": "Summarize: the cat sat on the mat. " * 6, "max_tokens": 24, "temperature": 0}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()["cosine"]["num_draft_tokens"] > 0
    before = read_snapshot(serve.url(), "cosine:")
    time.sleep(0.5)
    now = read_snapshot(serve.url(), "cosine:")
    assert all(now.workers[role] for role in ROLES), now.workers  # serve runs one of each
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(view(now, before))
    text = out.getvalue()
    for role in ROLES:
        hosts = {host_of(instance) for instance in now.workers[role]}
        cells = [[c.strip() for c in line.split("│")] for line in text.splitlines()]
        rows = [c for c in cells if len(c) == 7 and c[1] == role and c[2] in hosts]  # the workers table's rows
        assert rows and sum(int(c[3]) for c in rows) == len(now.workers[role]), (role, text)
    assert "prompt-lookup (general)" in text and "output tokens/s" in text and "verifier busy" in text
