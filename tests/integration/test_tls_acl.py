"""TLS and ACL users against Debian's redis-server (the embedded Valkey has no TLS): a CA and a
server certificate made by the test (openssl), a server that speaks only TLS and requires a
password; the workers connect as the worker ACL user over ``rediss://`` with the CA file in the
URL (``?ssl_ca_certs=``), a client as the client user; what each user may not do is refused."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from cosine.acl import ROLE_KEYS, acl_setuser_rules, client_rules, role_rules, worker_rules
from tests.conftest import cache_dir
from tests.integration.harness import Pipeline, final_of, read_output, write_config

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("openssl")), reason="needs Debian's redis-server and openssl")
ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "admin-secret"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost (one day)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=cosine-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert), "-days", "1",
        "-extfile", str(extensions))
    return ca, cert, key


@pytest.fixture()
def tls_server(tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--requirepass", ADMIN_PASSWORD, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"127.0.0.1:{port}/?ssl_ca_certs={ca}"
    admin = redis.Redis.from_url(f"rediss://:{ADMIN_PASSWORD}@{base}")
    deadline = time.monotonic() + 15
    while True:
        try:
            admin.ping()
            break
        except (redis.ConnectionError, OSError):
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    yield {"port": port, "ca": ca, "base": base, "admin": admin}
    process.terminate()
    process.wait(10)


def test_tls_needs_the_ca_and_tls(tls_server):
    port = tls_server["port"]
    with pytest.raises(redis.ConnectionError):  # the system CAs do not know the test's CA
        redis.Redis.from_url(f"rediss://:{ADMIN_PASSWORD}@127.0.0.1:{port}", socket_connect_timeout=5).ping()
    with pytest.raises(redis.ConnectionError):  # plain text on the TLS port
        redis.Redis.from_url(f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{port}", socket_connect_timeout=5, socket_timeout=5).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"rediss://:wrong@{tls_server['base']}").ping()


def test_workers_over_tls_as_the_worker_user_and_a_client_that_can_only_submit_and_read(tls_server, tmp_path, demo_target, greedy_references, pipelines):
    admin = tls_server["admin"]
    admin.execute_command("ACL", "SETUSER", "cosine-worker", *acl_setuser_rules("worker-secret", worker_rules()))
    admin.execute_command("ACL", "SETUSER", "cosine-client", *acl_setuser_rules("client-secret", client_rules()))
    worker_url = f"rediss://cosine-worker:worker-secret@{tls_server['base']}"
    client_url = f"rediss://cosine-client:client-secret@{tls_server['base']}"

    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=[])
    pipeline = Pipeline(worker_url, config, admin_url=f"rediss://:{ADMIN_PASSWORD}@{tls_server['base']}")
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "verifier"):
        pipeline.start(role)
    for role in ("verifier", "coordinator", "router"):
        pipeline.wait_live(role, 1)

    client = redis.Redis.from_url(client_url)
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    client.xadd("cosine:requests", {"id": "over-tls", "messages": json.dumps([{"role": "user", "content": texts[0]}]), "max_tokens": "8"})
    final = final_of(read_output(client, "over-tls", timeout=120))
    assert json.loads(final["token_ids"]) == greedy_references[0][:8], final
    # What the client user may not do: read request state, write internal streams, flush, read
    # another namespace.
    for forbidden in (lambda: client.hgetall("cosine:req:over-tls"), lambda: client.xadd("cosine:verified", {"m": b"x"}),
                      lambda: client.flushall(), lambda: client.xadd("other:requests", {"a": "b"}), lambda: client.xadd("cosine:out:over-tls", {"a": "b"})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    worker = redis.Redis.from_url(worker_url)
    for forbidden in (lambda: worker.flushall(), lambda: worker.config_get("*"), lambda: worker.keys("*"), lambda: worker.set("other:key", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    assert all(p.poll() is None for p in pipeline.processes), pipeline.log_tails()


def test_a_user_per_role(tls_server, tmp_path, demo_target, greedy_references, pipelines):
    """Each role's workers connect as a user of their own (``role_rules``): a request drafted
    (prompt lookup), fused, verified and applied, a cancellation, a bad request and garbage on
    internal streams all go through; a role's user may not touch another role's keys."""
    admin = tls_server["admin"]
    urls = {}
    for role in ROLE_KEYS:
        admin.execute_command("ACL", "SETUSER", f"cosine-{role}", *acl_setuser_rules(f"{role}-secret", role_rules(role)))
        urls[role] = f"rediss://cosine-{role}:{role}-secret@{tls_server['base']}"
    lookup = {"name": "prompt-lookup", "kind": "prompt-lookup", "expert": "lookup"}
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=[lookup])
    by_role = {role: Pipeline(url, config, admin_url=f"rediss://:{ADMIN_PASSWORD}@{tls_server['base']}") for role, url in urls.items()}
    pipelines.extend(by_role.values())
    for role in ("router", "coordinator", "fusion", "verifier"):
        by_role[role].start(role)
    by_role["drafter"].start("drafter", "--expert", "lookup")
    watcher = by_role["coordinator"]  # every key: it can see everyone's liveness
    for role in ("verifier", "drafter", "coordinator", "router", "fusion"):
        watcher.wait_live(role, 1)

    client = redis.Redis.from_url(f"rediss://:{ADMIN_PASSWORD}@{tls_server['base']}")
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    repeat = "Summarize: " + texts[0] + " " + texts[0]  # prompt lookup finds n-grams to draft
    client.xadd("cosine:requests", {"id": "per-role", "messages": json.dumps([{"role": "user", "content": texts[0]}]), "max_tokens": "8"})
    client.xadd("cosine:requests", {"id": "per-role-lookup", "prompt": repeat, "max_tokens": "24"})
    client.xadd("cosine:requests", {"id": "per-role-bad", "prompt": "hi", "max_tokens": "0"})
    client.xadd("cosine:requests", {"id": "per-role-cancel", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": "400"})
    client.xadd("cosine:drafts", {"m": b"garbage"})
    client.xadd("cosine:verified", {"m": b"garbage"})
    client.xadd("cosine:draft:lookup", {"m": b"garbage"})
    client.xadd("cosine:verify", {"m": b"garbage"})
    first = final_of(read_output(client, "per-role", timeout=120))
    assert json.loads(first["token_ids"]) == greedy_references[0][:8], first
    drafted = final_of(read_output(client, "per-role-lookup", timeout=120))
    assert drafted["finish_reason"] in ("length", "stop") and int(drafted["draft_tokens"]) > 0, drafted
    assert final_of(read_output(client, "per-role-bad", timeout=60))["error_code"] == "invalid"
    client.xadd("cosine:cancel", {"id": "per-role-cancel"})
    assert final_of(read_output(client, "per-role-cancel", timeout=120))["finish_reason"] in ("cancelled", "length")
    deadline = time.monotonic() + 30
    while client.xlen("cosine:dead") < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.xlen("cosine:dead") >= 4
    errors = {name: [line for line in path.read_text(errors="replace").splitlines() if "NOPERM" in line or "no permissions" in line]
              for name, path in ((p.name, p) for p in tmp_path.glob("*.log"))}
    assert not any(errors.values()), errors
    router = redis.Redis.from_url(urls["router"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        router.xadd("cosine:verified", {"m": b"x"})
    verifier = redis.Redis.from_url(urls["verifier"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        verifier.hgetall("cosine:reserved")
    assert all(p.poll() is None for pipeline in by_role.values() for p in pipeline.processes)
