"""``cosine serve`` keeps the pipeline up: the embedded server (password, append-only file,
restart with its data), restarted and counted workers, a clear stop when a worker cannot start,
no orphans when the supervisor itself is killed."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cosine.client import Client
from cosine.config import DEMO_TARGET_FILE, load_config
from cosine.embedded import EmbeddedRedis
from cosine.serve import QUICK_EXITS_FATAL, Backoff, Supervisor, warn_if_evicting
from cosine.status import read_status
from tests.conftest import cache_dir
from tests.integration.harness import ROOT

ROLES = ("router", "coordinator", "fusion", "verifier", "drafter")


# ---- the embedded server -----------------------------------------------------------------------


def test_embedded_server_refuses_a_client_without_the_password():
    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        assert redis.Redis.from_url(url).ping()
        with pytest.raises((redis.AuthenticationError, redis.ResponseError), match="(?i)auth"):
            redis.Redis(host="127.0.0.1", port=embedded.port, retry=Retry(NoBackoff(), 0)).ping()
    finally:
        embedded.stop()


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_embedded_server_keeps_its_data_through_kill_and_restart(tmp_path, fsync):
    embedded = EmbeddedRedis(tmp_path / "data", fsync=fsync)
    url = embedded.start()
    try:
        entry_id = redis.Redis.from_url(url).xadd("cosine:requests", {"id": "r1", "prompt": "hello"})
        old_pid = embedded.pid
        embedded.kill()
        assert not embedded.alive()
        assert embedded.restart() == url  # same port and password
        assert embedded.pid != old_pid
        entries = redis.Redis.from_url(url).xrange("cosine:requests")
        assert entries == [(entry_id, {b"id": b"r1", b"prompt": b"hello"})]
    finally:
        embedded.stop()
    assert (tmp_path / "data").is_dir()  # a directory given by the caller is kept


def test_supervisor_restarts_a_dead_embedded_server(tmp_path):
    # No worker in the plan: only the server is supervised.
    supervisor = Supervisor(load_config(None, environ={}), None, None, verifiers=0, drafters_per_expert=0, replicas=0, data_dir=tmp_path / "data")
    url = supervisor.start()
    try:
        redis.Redis.from_url(url).set("kept", "yes")
        supervisor.embedded.kill()
        wait_for(lambda: supervisor.check() or supervisor.embedded.alive(), 10, "the embedded server back")
        assert redis.Redis.from_url(url).get("kept") == b"yes"
    finally:
        supervisor.stop()


def test_backoff_doubles_caps_resets_and_gives_up():
    backoff = Backoff()
    assert [backoff.after_exit(20.0) for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.after_exit(61.0) == 0.5  # a long run starts over
    assert not backoff.hopeless()
    for _ in range(QUICK_EXITS_FATAL - 1):
        backoff.after_exit(1.0)
    assert not backoff.hopeless()
    backoff.after_exit(1.0)
    assert backoff.hopeless()


def test_replicas_scale_router_coordinator_and_fusion():
    config = load_config(None, environ={}).replace("serve", drafter_processes="separate")
    supervisor = Supervisor(config, "redis://127.0.0.1:1", None, verifiers=2, drafters_per_expert=1, replicas=2)
    roles = [args[0] for args in supervisor.plan()]
    drafters = len(config.drafters)  # one process per configured drafter (serve.drafter_processes = "separate")
    assert {role: roles.count(role) for role in set(roles)} == {"router": 2, "coordinator": 2, "fusion": 2, "verifier": 2, "drafter": drafters}


def test_an_evicting_external_server_gets_a_warning_and_a_refused_config_get_is_harmless(caplog):
    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        admin = redis.Redis.from_url(url)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING, logger="cosine.serve"):
            warn_if_evicting(url)
        assert "maxmemory-policy is allkeys-lru" in caplog.text

        caplog.clear()
        admin.acl_setuser("app", enabled=True, passwords=["+app-secret"], keys=["*"], commands=["+@all", "-config"])
        with caplog.at_level(logging.WARNING, logger="cosine.serve"):
            warn_if_evicting(f"redis://app:app-secret@127.0.0.1:{embedded.port}")
        assert caplog.text == ""
    finally:
        embedded.stop()


# ---- `cosine serve` as a process -----------------------------------------------------------------


class Served:
    """A `cosine serve` process with its own cache directory (so its serve.url) and data dir."""

    def __init__(self, tmp_path: Path, target: str, extra_args: tuple[str, ...] = ()) -> None:
        self.cache = tmp_path / "cache"
        self.cache.mkdir()
        for name in ("models", "converted"):  # the real model files, without converting again
            if (cache_dir() / name).is_dir():
                (self.cache / name).symlink_to(cache_dir() / name)
        config = tmp_path / "config.toml"
        config.write_text(
            f'[model]\ntarget = "{target}"\ncache_dir = "{self.cache}"\nthreads = 1\n'
            "[pipeline]\nblock_ms = 300\nheartbeat_ms = 300\n"
            '[[drafters]]\nname = "prompt-lookup"\nkind = "prompt-lookup"\nexpert = "general"\n'
        )
        self.log_path = tmp_path / "serve.log"
        # No COSINE_* from outside (CI sets COSINE_CACHE_DIR, which would outrank this config's
        # cache_dir and move serve.url elsewhere).
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSINE_")}
        self.config_path = config
        command = [sys.executable, "-m", "cosine.cli", "serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), "-v", *extra_args]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self) -> str:
        """The administrator's URL (every key: what the tests inspect)."""
        path = self.cache / "serve-admin.url"
        wait_for(lambda: path.is_file() and path.read_text().strip(), 60, "serve-admin.url", self)
        return path.read_text().strip()

    def client_url(self) -> str:
        """The clients' URL (the default tenant's user)."""
        path = self.cache / "serve.url"
        wait_for(lambda: path.is_file() and path.read_text().strip(), 60, "serve.url", self)
        return path.read_text().strip()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url())

    def wait_live(self) -> None:
        client = self.client()

        def all_live() -> bool:
            live = {key.split(b":")[2].decode() for key in client.scan_iter(match="cosine:live:*")}
            return live >= set(ROLES)

        wait_for(all_live, 240, "every role live", self)

    def children(self) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def worker_pids(self, role: str = "") -> list[int]:
        return [pid for pid in self.children() if f"cosine.cli worker {role}" in cmdline(pid)]

    def valkey_pid(self) -> int | None:
        return next((pid for pid in self.children() if "valkey-server" in cmdline(pid)), None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture()
def served(tmp_path) -> Callable[..., Served]:
    started: list[Served] = []

    def start(target: str | None = None) -> Served:
        started.append(Served(tmp_path, target or str(cache_dir() / "models" / DEMO_TARGET_FILE)))
        return started[-1]

    yield start
    for serve in started:
        serve.stop()


@pytest.fixture()
def demo_target_file() -> Path:
    path = cache_dir() / "models" / DEMO_TARGET_FILE
    if not path.is_file():
        pytest.skip("the demo target is not in the model cache (run `cosine models pull`)")
    return path


@pytest.mark.model
def test_a_killed_worker_is_restarted_and_counted_and_a_killed_server_too(served, demo_target_file):
    serve = served()
    serve.wait_live()
    client = serve.client()
    assert os.stat(serve.cache / "serve.url").st_mode & 0o777 == 0o600
    [victim] = serve.worker_pids("fusion")

    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        return serve.worker_pids("fusion") not in ([], [victim]) and client.hget("cosine:restarts", "fusion") == b"1"

    wait_for(replaced, 30, "a new fusion worker and restarts[fusion] == 1", serve)
    assert re.search(r"WARNING .*fusion worker exited \(killed by SIGKILL\) after [\d.]+ s; restarting it in 0\.5 s", serve.log())
    assert read_status(serve.url(), "cosine:")["restarts"] == {"fusion": 1}

    # The embedded server, killed, comes back on the same URL with its data; workers reconnect.
    server = serve.valkey_pid()
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: "the embedded valkey-server is back" in serve.log(), 30, "the embedded server restarted", serve)
    assert serve.valkey_pid() not in (None, server)
    assert client.hget("cosine:restarts", "fusion") == b"1"
    serve.wait_live()

    # Its users, made again on the restarted server: each worker connects as its role's user;
    # serve.url is the default tenant's (its own streams and outputs only), the administrator's
    # URL is in a file of its own, which `cosine status` reads; both files are the owner's alone.
    users = {entry["user"] for entry in client.client_list()}
    assert {"cosine-router", "cosine-coordinator", "cosine-fusion", "cosine-verifier", "cosine-drafter"} <= users, users
    assert os.stat(serve.cache / "serve-admin.url").st_mode & 0o777 == 0o600
    client_url = serve.client_url()
    assert client_url != serve.url() and "cosine-tenant-default" in client_url
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(client_url).hgetall("cosine:roster:router")
    with Client(client_url) as pipeline_client:
        assert pipeline_client.generate(prompt="Hello", max_tokens=4).finish_reason in ("length", "stop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSINE_")}
    shown = subprocess.run([sys.executable, "-m", "cosine.cli", "status", "--config", str(serve.config_path), "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert sum(json.loads(shown.stdout)["tenants"]["default"]["requests"].values()) >= 1


def test_a_worker_that_cannot_start_stops_serve(served):
    serve = served(target="/nonexistent.gguf")
    began = time.monotonic()
    code = serve.process.wait(120)
    assert code != 0
    assert time.monotonic() - began < 90
    assert re.search(r"error: the (router|coordinator|verifier) worker could not start", serve.log()), serve.log()[-3000:]
    assert "/nonexistent.gguf" in serve.log()


@pytest.mark.model
def test_killing_serve_leaves_no_worker(served, demo_target_file):
    serve = served()
    serve.wait_live()
    workers, server = serve.worker_pids(), serve.valkey_pid()
    assert len(workers) == len(ROLES)

    serve.process.kill()
    serve.process.wait()
    try:
        # SIGTERM from the kernel: they drain first, which takes seconds on a loaded 2-core machine.
        wait_for(lambda: not any(alive(pid) for pid in workers), 30, "every worker gone")
    finally:
        # The embedded server has no parent-death signal: the test stops it.
        if server is not None and "valkey-server" in cmdline(server):
            os.kill(server, signal.SIGKILL)


# ---- helpers ---------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str, serve: Served | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if serve is not None and serve.process.poll() is not None:
            raise AssertionError(f"cosine serve exited with {serve.process.returncode} waiting for {what}:\n{serve.log()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s" + (f":\n{serve.log()[-3000:]}" if serve else ""))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie lingers until init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_threads_per_role_verifiers_share_model_threads_and_drafters_take_their_own(tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text('[model]\nthreads = 4\n[[drafters]]\nname = "ee"\nkind = "early-exit"\nthreads = 3\n')
    config = load_config(config_file, environ={})
    assert config.drafters[0].threads == 3
    one = Supervisor(config, "redis://127.0.0.1:1", config_file, verifiers=1, drafters_per_expert=1)
    assert one._worker_env(("verifier",)).get("COSINE_MODEL_THREADS") == os.environ.get("COSINE_MODEL_THREADS")
    two = Supervisor(config, "redis://127.0.0.1:1", config_file, verifiers=2, drafters_per_expert=1)
    assert two._worker_env(("verifier",))["COSINE_MODEL_THREADS"] == "2"
    # Regression: every model process used to be forced to one thread, the verifier included.
    drafter_env = two._worker_env(("drafter", "--drafter", "ee", "--expert", "general"))
    assert drafter_env.get("COSINE_MODEL_THREADS") == os.environ.get("COSINE_MODEL_THREADS")


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli")
def test_the_embedded_servers_url_works_with_redis_cli():
    """The README's redis-cli example takes the embedded server's URL as it is written: with
    "redis://:password@" redis-cli 7.0 sent an empty user name and was refused (WRONGPASS)."""
    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    try:
        done = subprocess.run(["redis-cli", "-u", url, "--no-auth-warning", "PING"], capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "PONG", (done.stdout, done.stderr)
        assert redis.Redis.from_url(url).ping()
    finally:
        embedded.stop()
