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

from cosine.acl import acl_setuser_rules, client_rules, worker_rules
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
    pipeline = Pipeline(worker_url, config)
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
