"""``cosine serve``: the embedded Redis (when no URL is given) and the stage processes, supervised.

Workers are separate processes (``cosine worker ROLE``), exactly as they would be started by
hand on other machines. The supervisor restarts a worker that exits (with a backoff per worker),
gives up when a worker cannot start at all, restarts the embedded server if it dies (same port,
password and data), forwards SIGTERM for a graceful drain and stops the embedded server last.
Workers get a parent-death signal, so a ``serve`` killed outright leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cosine.acl import ROLE_KEYS, acl_setuser_rules, gateway_rules, role_rules
from cosine.bus import LibraryMissing, library_loaded_sync, setup_library
from cosine.config import Config, redacted_url
from cosine.deploy import DeploymentPlan, machine_cores, plan_deployment
from cosine.embedded import EmbeddedRedis
from cosine.tenants import tenant_rules, user_name, user_url
from cosine.wire import Keys
from cosine.wire.keys import DEFAULT_TENANT

log = logging.getLogger(__name__)

STARTUP_FAILED = 3  # exit code of `cosine worker` when it cannot start: restarting will not help
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_UPTIME_S = 60.0  # a process that ran this long starts its backoff over
QUICK_EXIT_S = 10.0
QUICK_EXITS_FATAL = 5  # this many exits in a row, each this soon after starting: give up
POLL_S = 0.2
SINGLE_ROLES = ("router", "coordinator", "fusion")  # scaled by --replicas
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class SupervisorError(RuntimeError):
    """Serving cannot go on: a worker cannot start, or the embedded server cannot be kept up."""


@dataclass
class Backoff:
    """Restart delays of one supervised process, and when restarting it is pointless."""

    delay_s: float = BACKOFF_FIRST_S
    quick_exits: int = 0

    def after_exit(self, uptime_s: float) -> float:
        """The wait before the next start: 0.5 s doubling up to 30 s, from 0.5 s again after a
        run of 60 s."""
        if uptime_s >= STABLE_UPTIME_S:
            self.delay_s = BACKOFF_FIRST_S
        self.quick_exits = self.quick_exits + 1 if uptime_s < QUICK_EXIT_S else 0
        delay, self.delay_s = self.delay_s, min(BACKOFF_MAX_S, self.delay_s * 2)
        return delay

    def hopeless(self) -> bool:
        return self.quick_exits >= QUICK_EXITS_FATAL


@dataclass
class WorkerSlot:
    """One worker process kept running: its `cosine worker` arguments (role first)."""

    args: tuple[str, ...]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: Backoff = field(default_factory=Backoff)

    @property
    def role(self) -> str:
        return self.args[0]

    @property
    def name(self) -> str:
        return " ".join(self.args)


class Supervisor:
    def __init__(
        self,
        config: Config,
        redis_url: str | None,
        config_path: Path | None,
        verifiers: int = 1,
        drafters_per_expert: int = 1,
        verbose: bool = False,
        *,
        replicas: int = 1,
        data_dir: Path | None = None,
        fsync: str = "everysec",
        gateway: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.config_path = config_path
        self.verifiers = verifiers
        self.drafters_per_expert = drafters_per_expert
        self.replicas = replicas
        self.gateway = tuple(gateway) if gateway is not None else None  # `cosine gateway` arguments
        self.verbose = verbose
        self.keys = Keys(config.redis.namespace)
        self.embedded = None if redis_url else EmbeddedRedis(data_dir, fsync=fsync)
        self.server_backoff = Backoff()
        self.server_started_at = 0.0
        self.server_restart_at: float | None = None
        self.slots: list[WorkerSlot] = []
        self.counter: redis.Redis | None = None
        self.url = ""  # the administrator's
        self.client_url = ""  # the default tenant's: what clients of this server use
        self.user_urls: dict[str, str] = {}  # role (and "gateway") -> its user's URL
        self.passwords: dict[str, str] = {}  # ACL user -> password, kept for a restart of the server
        self.deployment: DeploymentPlan = plan_deployment(config, machine_cores(), verifiers)

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> str:
        if self.embedded is not None:
            self.url = self.embedded.start()
            self.server_started_at = time.monotonic()
            setup_library(self.url)
            self._make_users()
        else:
            self.url = self.client_url = self.redis_url
            warn_if_evicting(self.url)
            self._library_on_a_server_of_others(self.url)
        self.counter = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        self.slots = [WorkerSlot(tuple(args)) for args in self.plan()]
        for slot in self.slots:
            self._spawn(slot)
        return self.url

    def _make_users(self) -> None:
        """On the embedded server: a user per role (only the keys it uses), the gateway's and
        the default tenant's (a client: its own streams and outputs), each with a random
        password. Made again, with the same passwords, after the server restarts (ACL users are
        not in its append-only file)."""
        namespace = self.config.redis.namespace
        users = {role: (f"cosine-{role}", role_rules(role, namespace)) for role in ROLE_KEYS}
        users["gateway"] = ("cosine-gateway", gateway_rules(namespace))
        users["client"] = (user_name(DEFAULT_TENANT), tenant_rules(DEFAULT_TENANT, namespace))
        with redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5) as admin:
            for key, (name, rules) in users.items():
                password = self.passwords.setdefault(name, secrets.token_urlsafe(24))
                admin.execute_command("ACL", "SETUSER", name, *acl_setuser_rules(password, rules))
                self.user_urls[key] = user_url(self.url, name, password)
        self.client_url = self.user_urls["client"]

    def plan(self) -> list[list[str]]:
        """`cosine worker` arguments of every process to keep running."""
        plan = [[role] for role in SINGLE_ROLES for _ in range(self.replicas)]
        plan += [["verifier"]] * self.verifiers
        if self.deployment.shared_drafters and self.config.drafters:
            hosted = [arg for spec in self.config.drafters for arg in ("--drafter", spec.name)]
            plan += [["drafter", *hosted]] * self.drafters_per_expert
        else:
            for spec in self.config.drafters:
                plan += [["drafter", "--drafter", spec.name, "--expert", spec.expert]] * self.drafters_per_expert
        if self.gateway is not None:
            plan.append(["gateway", *self.gateway])
        return plan

    def _worker_env(self, args: tuple[str, ...] = ()) -> dict[str, str]:
        # The URL (with its password) goes in the environment, not on a command line that any
        # local user can read in `ps`.
        env = dict(os.environ, COSINE_REDIS_URL=self.user_urls.get(args[0] if args else "", self.url))
        # glibc gives each thread that allocates its own heap arena (up to 8 per core) and keeps
        # freed pages in each: a drafter process held ~90 MB more after 100 requests for it.
        # Two arenas serve a model thread and the event loop; a value set by the user wins.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        # Threads per role: the verifiers share model.threads (COSINE_MODEL_THREADS included);
        # each model drafter's process takes its own drafters.threads (read by the worker).
        if args[:1] == ("verifier",) and self.verifiers > 1:
            env["COSINE_MODEL_THREADS"] = str(self.verifier_threads())
        if args[:1] == ("drafter",):  # decided once here, for the deployment as a whole
            env["COSINE_SPECULATION_PIPELINING"] = "on" if self.deployment.pipelining else "off"
        return env

    def describe(self) -> str:
        """The deployment in one line and why (printed at start)."""
        roles: dict[str, int] = {}
        for args in self.plan():
            roles[args[0]] = roles.get(args[0], 0) + 1
        drafters = len(self.config.drafters)
        layout = ", ".join(f"{count} {role}" for role, count in roles.items())
        hosted = f" ({drafters} drafters{' in one process' if self.deployment.shared_drafters else ''})" if drafters else ""
        return f"deployment: {layout}{hosted} — {self.deployment.describe()}"

    def verifier_threads(self) -> int:
        """torch threads of each verifier process: model.threads shared among the verifiers."""
        return max(1, self.config.model.threads // self.verifiers)

    def _spawn(self, slot: WorkerSlot) -> None:
        # The gateway is a command of its own; every other slot is a `cosine worker`.
        command = [sys.executable, "-m", "cosine.cli", *(() if slot.role == "gateway" else ("worker",)), *slot.args]
        if self.config_path:
            command += ["--config", str(self.config_path)]
        if self.verbose:
            command.append("--verbose")
        slot.process = subprocess.Popen(command, env=self._worker_env(slot.args), preexec_fn=die_with_parent())
        slot.started_at = time.monotonic()
        slot.restart_at = None

    # ---- supervise ---------------------------------------------------------------------------

    def wait(self) -> None:
        """Keep everything running until SIGINT or SIGTERM; raises SupervisorError when serving
        cannot go on."""
        stop = {"now": False}

        def on_signal(signum, frame) -> None:
            stop["now"] = True

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop["now"]:
                self.check()
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def check(self) -> None:
        """One supervision pass: the embedded server first, since every worker needs it."""
        self._check_server()
        for slot in self.slots:
            self._check_worker(slot)

    def _check_worker(self, slot: WorkerSlot) -> None:
        now = time.monotonic()
        if slot.process is not None and slot.process.poll() is not None:
            self._schedule_restart(slot, now)
        if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
            self._spawn(slot)
            self._count_restart(slot.role)

    def _schedule_restart(self, slot: WorkerSlot, now: float) -> None:
        code, uptime_s = slot.process.returncode, now - slot.started_at
        slot.process = None
        if code == STARTUP_FAILED:
            raise SupervisorError(f"the {slot.role} worker could not start ({slot.name!r} exited with code {code}; its error is above)")
        delay_s = slot.backoff.after_exit(uptime_s)
        if slot.backoff.hopeless():
            raise SupervisorError(
                f"the {slot.role} worker exited {QUICK_EXITS_FATAL} times in a row within {QUICK_EXIT_S:.0f} s of starting "
                f"(last: {describe_exit(code)}); giving up"
            )
        log.warning("%s worker exited (%s) after %.1f s; restarting it in %.1f s", slot.name, describe_exit(code), uptime_s, delay_s)
        slot.restart_at = now + delay_s

    def _count_restart(self, role: str) -> None:
        try:
            self.counter.hincrby(self.keys.restarts, role, 1)
        except (redis.RedisError, OSError) as error:  # counting must never stop the supervision
            log.warning("could not count the %s restart in Redis: %s", role, error)

    def _check_server(self) -> None:
        if self.embedded is None or self.embedded.alive():
            return
        now = time.monotonic()
        if self.server_restart_at is None:
            delay_s = self.server_backoff.after_exit(now - self.server_started_at)
            if self.server_backoff.hopeless():
                raise SupervisorError(f"the embedded valkey-server died {QUICK_EXITS_FATAL} times in a row soon after starting; see {self.embedded.data_dir}/valkey.log")
            log.warning("the embedded valkey-server died; restarting it on port %s with its data in %.1f s", self.embedded.port, delay_s)
            self.server_restart_at = now + delay_s
        if now >= self.server_restart_at:
            self._restart_server(now)

    def _restart_server(self, now: float) -> None:
        self.server_restart_at = None
        self.server_started_at = now
        try:
            self.embedded.restart()
        except Exception as error:  # port taken, bad AOF...: counts as a quick death, retried
            log.error("could not restart the embedded valkey-server: %s", error)
            return
        log.warning("the embedded valkey-server is back on port %s (data: %s)", self.embedded.port, self.embedded.data_dir)
        try:
            setup_library(self.url)  # kept in its append-only file; loaded again if that was lost
            self._make_users()
        except (redis.RedisError, OSError) as error:
            log.error("could not load the function library or make the users on the restarted server: %s", error)

    @staticmethod
    def _library_on_a_server_of_others(url: str) -> None:
        """On a server named by --redis-url: load the library if this URL may (an administrator's);
        else it must be there already (``cosine setup``)."""
        try:
            try:
                setup_library(url)
            except redis.exceptions.NoPermissionError:
                if not library_loaded_sync(url):
                    raise SupervisorError(str(LibraryMissing())) from None
        except (redis.RedisError, OSError) as error:
            raise SupervisorError(f"{redacted_url(url)}: {type(error).__name__}: {error}") from None

    # ---- stop --------------------------------------------------------------------------------

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every worker (they drain), kill those still running after ``grace_s``, then
        stop the embedded server. A gateway goes first: its open streams finish while the
        pipeline still runs."""
        first = [slot for slot in self.slots if slot.role == "gateway"]
        for group in (first, [slot for slot in self.slots if slot not in first]):
            running = [slot.process for slot in group if slot.process is not None and slot.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for process in running:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for slot in self.slots:
            slot.process, slot.restart_at = None, None
        if self.counter is not None:
            self.counter.close()
        if self.embedded is not None:
            self.embedded.stop()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies, even by SIGKILL
    (no orphaned workers); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def warn_if_evicting(url: str) -> None:
    """An ``allkeys-*`` eviction policy may silently drop request state and streams."""
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "")
    except redis.RedisError as error:  # CONFIG is often refused on managed servers
        log.info("could not read the server's maxmemory-policy: %s", error)
        return
    finally:
        client.close()
    if policy.startswith("allkeys-"):
        log.warning("the Redis server's maxmemory-policy is %s: under memory pressure it may evict request state and streams silently; use noeviction", policy)
