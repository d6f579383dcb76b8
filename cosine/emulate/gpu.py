"""Emulated GPUs that processes share: drafters placed on the verifiers' GPUs.

A shared GPU is a lock file (``gpu-<i>`` in ``emulate.gpu_dir``): a call on it — a verifier's
forward, a drafter's job — holds an exclusive ``flock`` for its profiled time, so the calls of
the processes on one GPU run one at a time, as kernels of two models on one device do. Each
``SharedGpu`` opens the file itself: two of them in one process (drafters sharing a process)
exclude each other as two processes do. A verifier takes the first GPU no other verifier holds
(``claim-<i>``, held while it lives; a killed verifier's GPU is free for its replacement).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class SharedGpu:
    def __init__(self, directory: str | Path, index: int) -> None:
        self.index = index
        self.claim_fd: int | None = None  # a verifier's claim on the GPU, held (open) while it lives
        self.path = Path(directory) / f"gpu-{index}"
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)

    def __enter__(self) -> SharedGpu:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def claim_gpu(directory: str | Path, count: int) -> SharedGpu:
    """The first of ``count`` shared GPUs no other live verifier holds; ValueError when every
    one is held (more verifiers than ``emulate.shared_gpus``)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        fd = os.open(Path(directory) / f"claim-{index}", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        gpu = SharedGpu(directory, index)
        gpu.claim_fd = fd
        return gpu
    raise ValueError(f"emulate.shared_gpus: all {count} shared GPUs in {directory} are held by other verifiers")


def drafter_gpu_index(config, name: str) -> int | None:
    """The shared GPU an emulated drafter runs on: with ``emulate.shared_gpus``, the verifiers'
    GPU of its place among the emulated drafters (round robin); None: a GPU of its own."""
    emulate = config.emulate
    if not emulate.shared_gpus:
        return None
    emulated = [spec.name for spec in config.drafters if spec.kind == "emulated"]
    return emulated.index(name) % emulate.shared_gpus


def drafter_gpu(config, name: str) -> contextlib.AbstractContextManager:
    """What an emulated drafter's calls hold: its shared GPU, or nothing (a GPU of its own)."""
    index = drafter_gpu_index(config, name)
    if index is None:
        return contextlib.nullcontext()
    Path(config.emulate.gpu_dir).mkdir(parents=True, exist_ok=True)
    return SharedGpu(config.emulate.gpu_dir, index)
