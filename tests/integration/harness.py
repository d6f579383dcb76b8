"""A real pipeline for tests: a real Redis server and real worker processes.

Workers are started exactly as a user starts them (``python -m cosine.cli worker ROLE``); the
test talks to Redis with a plain client, as any client would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cosine.bus import setup_library

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, *, cache_dir: Path, target: str, drafters: list[dict], pipeline: dict | None = None, speculation: dict | None = None) -> Path:
    settings = {
        "block_ms": 300,
        "claim_idle_ms": 2000,
        "heartbeat_ms": 300,
        "batch_wait_ms": 400,
        "drafter_deadline_ms": 20000,
        "fusion_deadline_ms": 3000,
        **(pipeline or {}),
    }
    lines = ["[model]", f'target = "{target}"', f'cache_dir = "{cache_dir}"', "threads = 1", "[pipeline]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    # Drafting is what most pipeline tests exercise: load control (which may choose window 0
    # for every round on a busy test machine) is on only where a test asks for it.
    speculation = {"load_control": False, **(speculation or {})}
    lines += ["[speculation]", *(f"{key} = {json.dumps(value)}" for key, value in speculation.items())]
    lines += ["[router]", 'default_experts = ["general"]', "max_experts = 2", "[router.keywords]", 'lookup = ["summarize"]']
    for drafter in drafters:
        lines.append("[[drafters]]")
        for key, value in drafter.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Pipeline:
    url: str
    config_path: Path
    namespace: str = "cosine:"
    processes: list[subprocess.Popen] = field(default_factory=list)
    admin_url: str = ""  # who loads the function library (`cosine setup`): default, `url`

    def __post_init__(self) -> None:
        setup_library(self.admin_url or self.url)

    def start(self, role: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "cosine.cli", "worker", role, "--redis-url", self.url, "--config", str(self.config_path), "-v", *args]
        env = dict(os.environ, COSINE_MODEL_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        log_path = self.config_path.parent / f"{role}-{len(self.processes)}.log"
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
        self.processes.append(process)
        return process

    def start_stages(self, *drafter_experts: str) -> None:
        """A router, coordinator, fusion and verifier, and a drafter for each expert given;
        returns once every one of them is live."""
        roles = ["router", "coordinator", "fusion", "verifier"]
        for role in roles:
            self.start(role)
        for expert in drafter_experts:
            self.start("drafter", "--expert", expert)
        for role in ("verifier", *(["drafter"] if drafter_experts else []), "coordinator", "router", "fusion"):
            self.wait_live(role, len(drafter_experts) if role == "drafter" else 1)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def wait_live(self, role: str, count: int, timeout: float = 180.0) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(list(client.scan_iter(match=f"{self.namespace}live:{role}:*"))) >= count:
                return
            for process in self.processes:
                if process.poll() is not None and process.returncode not in (0, -9, -15):
                    raise RuntimeError(f"worker {process.args[4:6]} exited with {process.returncode}")
            time.sleep(0.2)
        raise TimeoutError(f"{count} live {role} workers not seen within {timeout}s")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every worker's log, for a failing test's message."""
        parts = []
        for path in sorted(self.config_path.parent.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def kill(self, process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def submit(client: redis.Redis, namespace: str = "cosine:", **fields) -> str:
    entry_id = client.xadd(f"{namespace}requests", {k: str(v) for k, v in fields.items()})
    return fields.get("id") or entry_id.decode()


def read_output(client: redis.Redis, request_id: str, timeout: float = 300.0, namespace: str = "cosine:") -> list[dict]:
    """Every entry of out:{id} up to and including the final one."""
    key, last, entries = f"{namespace}out:{request_id}", "0-0", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = client.xread({key: last}, block=500)
        for _, items in reply or []:
            for entry_id, fields in items:
                last = entry_id
                entry = {k.decode(): v.decode() for k, v in fields.items()}
                entries.append(entry)
                if entry["type"] == "final":
                    return entries
    raise TimeoutError(f"request {request_id}: no final entry within {timeout}s; got {entries}")


def final_of(entries: list[dict]) -> dict:
    finals = [e for e in entries if e["type"] == "final"]
    assert len(finals) == 1, entries
    return finals[0]


def redis_server_binaries() -> list[str]:
    """Kinds of real server available: the embedded Valkey always, Debian's redis-server if installed."""
    kinds = ["valkey"]
    if shutil.which("redis-server"):
        kinds.append("redis-server")
    return kinds


class RedisServerProcess:
    """Debian's redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def make_chain_model(directory: Path, tokenizer, hidden: int = 64):
    """A test-only target whose forward takes about a millisecond and whose greedy choice is
    never a near tie: a 2-layer Llama with the demo tokenizer whose residual stream is held by
    the last token's embedding (large) and whose output rows are the embeddings permuted, so the
    next token is a fixed function of the last one (a cycle through the vocabulary, varied per
    prompt) chosen by a wide margin. Outputs can be checked exactly against ``greedy_chain`` at
    any batch size. Returns the loaded model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    generator = torch.Generator().manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        embeddings = torch.randn(config.vocab_size, hidden, generator=generator)
        model.model.embed_tokens.weight.copy_(embeddings)
        model.lm_head.weight.copy_(embeddings[torch.randperm(config.vocab_size, generator=generator)])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def greedy_chain(model, prompt_ids: list[int], max_tokens: int, eos_ids) -> list[int]:
    """The model's greedy continuation (whole-sequence forwards, batch 1): the reference."""
    import torch

    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos_ids:
                break
    return ids[len(prompt_ids):]


def skewed(seconds: float) -> dict[str, str]:
    """A worker's environment that runs its whole process's wall clock ``seconds`` off (a
    start-up hook: ``tests/skewed_clock/sitecustomize.py``)."""
    return {"PYTHONPATH": str(ROOT / "tests" / "skewed_clock"), "COSINE_TEST_CLOCK_SKEW_S": str(seconds)}
