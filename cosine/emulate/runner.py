"""The emulated target: the verifier's model runner with the oracle in place of a model.

It keeps what the verifier relies on — each request's cached tokens (reused when a round's
context extends them), commit, release, K/V accounting — and returns rows whose argmax is the
oracle's token (and whose softmax is the oracle's sampled distribution). Each forward computes
its rows first, then sleeps on the calling thread (the verifier's model thread) until its start
plus the profiled time of the batch: requests, fed tokens and the K/V rows it reads, times the
slow-down factor. Overshoot is recorded per call.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from cosine.core.tree import ROOT
from cosine.models.runner import BLOCK_SIZE, FedStates, ForwardItem, common_prefix

from .oracle import Oracle
from .profiles import TargetProfile
from .timing import Recorder, sleep_until

FLOOR = -1.0e4  # logit of tokens outside the oracle's support


class EmulatedRunner:
    def __init__(self, profile: TargetProfile, oracle: Oracle, vocab_size: int, sampling: Sequence[float],
                 slowdown: float = 1.0, recorder: Recorder | None = None, gpu=None) -> None:
        self.profile = profile
        self.gpu = gpu if gpu is not None else contextlib.nullcontext()  # a GPU shared with drafters (emulate.shared_gpus)
        self.oracle = oracle
        self.vocab_size = vocab_size
        self.slowdown = slowdown
        self.recorder = recorder or Recorder()
        self.num_blocks = profile.kv_capacity_tokens // BLOCK_SIZE
        self._logits = [math.log(p) if p > 0 else FLOOR for p in sampling]
        self._cached: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    # ---- what the verifier calls ---------------------------------------------------------

    def forward(self, items: Sequence[ForwardItem]) -> list[torch.Tensor]:
        return self.forward_with_states(items)[0]

    def forward_with_states(self, items: Sequence[ForwardItem]) -> tuple[list[torch.Tensor], list[FedStates]]:
        if not items:
            return [], []
        with self.gpu:  # on a shared GPU, the forward's time starts once the GPU is its own
            began = time.perf_counter()
            fed = rows = 0
            with self._lock:
                for item in items:
                    fed += len(item.context) - self._reusable(item.key, item.context) + len(item.tree_tokens)
                    rows += len(item.context)
                    self._cached.pop(item.key, None)
                    self._cached[item.key] = list(item.context)
            logits = [self._rows(item) for item in items]
            profiled = self.slowdown * self.profile.step_ms(len(items), fed, rows) / 1000
            sleep_until(began + profiled)
            self.recorder.add("target", profiled, time.perf_counter() - began)
        empty = torch.empty(0, 0)
        return logits, [FedStates(len(item.context), empty) for item in items]

    def commit(self, key: str, accepted_nodes: Sequence[int], accepted_tokens: Sequence[int]) -> None:
        with self._lock:
            if key in self._cached:
                self._cached[key].extend(int(t) for t in accepted_tokens)

    def release(self, key: str) -> None:
        self.release_many([key])

    def release_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._cached.pop(key, None)

    def forget_prefixes(self) -> None:
        """No shared prefix blocks here: nothing to forget."""

    def cached_keys(self) -> list[str]:
        with self._lock:
            return list(self._cached)

    @property
    def cache_count(self) -> int:
        return len(self._cached)

    @property
    def allocated_bytes(self) -> int:
        return sum(len(tokens) for tokens in list(self._cached.values())) * self.profile.kv_bytes_per_token

    def reusable_tokens(self, key: str, context: Sequence[int]) -> int:
        with self._lock:
            return self._reusable(key, context)

    # ---- internals -----------------------------------------------------------------------

    def _reusable(self, key: str, context: Sequence[int]) -> int:
        cached = self._cached.get(key)
        return 0 if cached is None else common_prefix(cached, context, limit=len(context) - 1)

    def _rows(self, item: ForwardItem) -> torch.Tensor:
        """Row 0 after the context, row i + 1 after tree node i: the oracle's greedy token at
        the top, three others below it (the sampled distribution's support)."""
        context, tokens, parents = item.context, item.tree_tokens, item.tree_parents
        length = len(context)
        last2 = context[-2] if length > 1 else -1
        depth = [0] * len(tokens)
        heads = [(last2, context[-1], length)]
        for i, (token, parent) in enumerate(zip(tokens, parents)):
            if parent == ROOT:
                depth[i], before = 1, context[-1]
            else:
                depth[i], before = depth[parent] + 1, tokens[parent]
            heads.append((before, token, length + depth[i]))
        width = len(self._logits)
        out = torch.full((len(heads), self.oracle.high), FLOOR)
        index = [token for prev2, prev1, position in heads for token in self.oracle.support(prev2, prev1, position, width)]
        rows = torch.arange(len(heads)).repeat_interleave(width)
        out[rows, torch.tensor(index)] = torch.tensor(self._logits).repeat(len(heads))
        return out
