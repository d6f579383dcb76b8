"""Shared helpers for the benchmark scripts in bench/.

- ``add_model_options`` / ``load_target``: the target model from a GGUF file or directory
  (``--target`` defaults to $COSINE_TARGET, ``--cache-dir`` to $COSINE_CACHE_DIR);
- ``stamp``: what the numbers were measured on (git commit, CPU model, torch / transformers
  versions, thread counts; deliberately no hostname);
- ``load_prompts`` / ``chat_ids``: bench/prompts.jsonl and the chat template applied to it;
- ``write_result``: bench/results/<name>-<timestamp>.json plus <name>-latest.json;
- ``median``, ``loadavg``, ``OtherCpu`` (how busy the rest of the machine was during a run).

The scripts are run as ``python bench/<script>.py`` from the repository root (or anywhere:
paths here are relative to this file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
PROMPTS_FILE = BENCH_DIR / "prompts.jsonl"

DEFAULT_TARGET = "~/.cache/cosine/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = "~/.cache/cosine"


# ---- model ---------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("COSINE_TARGET", DEFAULT_TARGET),
        help="target model: GGUF file or transformers directory (default: $COSINE_TARGET or %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("COSINE_CACHE_DIR", DEFAULT_CACHE_DIR),
        help="where converted GGUF weights are cached (default: $COSINE_CACHE_DIR or %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")


def setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def load_target(args: argparse.Namespace):
    """The LoadedModel (model, tokenizer, fingerprint) named by --target / --cache-dir."""
    from cosine.models.loading import load_model

    return load_model(args.target, cache_dir=args.cache_dir)


# ---- prompts -------------------------------------------------------------------------------


def load_prompts(path: str | os.PathLike = PROMPTS_FILE, limit: int | None = None) -> list[dict[str, Any]]:
    """Prompts from a JSONL file: {"id", "domain", "messages"} per line, in file order."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                prompts.append(json.loads(line))
    return prompts[:limit] if limit else prompts


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template with the generation prompt appended.

    transformers 5 returns a BatchEncoding from apply_chat_template (older versions a list).
    """
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(t) for t in ids]


# ---- stamp and results ---------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (a run's own threads count too)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


class OtherCpu:
    """Share of the machine's CPU time used by *other* processes between start() and share().

    Linux only: busy jiffies from /proc/stat minus this process's own user + system time,
    over wall time x CPU count. On a 2-core machine a competing process running two threads
    makes torch timings many times slower, so results should be read with this number:
    near 0 means the measurement had the machine to itself.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [int(x) for x in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def share(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None


def report_other_cpu(share: float | None) -> None:
    if share is not None:
        note = "  WARNING: the machine was shared, timings are inflated" if share > 0.1 else ""
        print(f"other processes used {share:.0%} of the machine's CPU during the run{note}")


def stamp() -> dict[str, Any]:
    """Machine and code description stored with every result (no hostname)."""
    import torch
    import transformers

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine skews CPU timings: keep the 1/5/15-minute load averages
        "loadavg": loadavg(),
        "argv": sys.argv,
        "utc_time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write bench/results/<name>-<timestamp>.json and <name>-latest.json; return the first."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    timestamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=2) + "\n"
    paths = [RESULTS_DIR / f"{name}-{timestamp}.json", RESULTS_DIR / f"{name}-latest.json"]
    for path in paths:
        partial = path.with_name(path.name + ".tmp")  # ignored by .gitignore
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)  # atomic: a reader never sees half a file
    return paths[0]


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None
