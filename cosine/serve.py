"""``cosine serve``: the embedded Redis (when no URL is given) and one process per stage.

Workers are separate processes (``cosine worker ROLE``), exactly as they would be started by
hand on other machines; this supervisor only starts them, forwards SIGTERM for a graceful drain,
and stops the embedded server last.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cosine.bus import EmbeddedRedis
from cosine.config import Config

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, config: Config, redis_url: str | None, config_path: Path | None, verifiers: int, drafters_per_expert: int, verbose: bool) -> None:
        self.config = config
        self.redis_url = redis_url
        self.config_path = config_path
        self.verifiers = verifiers
        self.drafters_per_expert = drafters_per_expert
        self.verbose = verbose
        self.embedded = EmbeddedRedis()
        self.processes: list[subprocess.Popen] = []

    def start(self) -> str:
        url = self.redis_url or self.embedded.start()
        plan: list[list[str]] = [["router"], ["coordinator"], ["fusion"]]
        plan += [["verifier"]] * self.verifiers
        for spec in self.config.drafters:
            plan += [["drafter", "--drafter", spec.name, "--expert", spec.expert]] * self.drafters_per_expert
        model_processes = self.verifiers + sum(1 for d in self.config.drafters if d.kind != "prompt-lookup") * self.drafters_per_expert
        env = dict(os.environ, COSINE_REDIS_URL=url)
        # Several model processes share the cores: one torch thread each avoids oversubscription.
        if model_processes > 1 and "COSINE_MODEL_THREADS" not in os.environ:
            env["COSINE_MODEL_THREADS"] = "1"
        for args in plan:
            command = [sys.executable, "-m", "cosine.cli", "worker", *args, "--redis-url", url]
            if self.config_path:
                command += ["--config", str(self.config_path)]
            if self.verbose:
                command.append("--verbose")
            self.processes.append(subprocess.Popen(command, env=env))
        return url

    def wait(self) -> None:
        stop = {"now": False}

        def on_signal(signum, frame) -> None:
            stop["now"] = True

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop["now"]:
                for process in self.processes:
                    if process.poll() is not None:
                        log.warning("worker %s exited with %s", process.args[4:6], process.returncode)
                        self.processes.remove(process)
                        break
                if not self.processes:
                    return
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self, grace_s: float = 15.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        self.embedded.stop()
