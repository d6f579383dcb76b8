"""How a deployment fits the machine it runs on (pure: the cores are an argument).

One rule decides two things, for ``cosine serve`` and for a lone ``cosine worker drafter``:

- **Drafter processes.** Every drafter process carries a Python interpreter, torch and what its
  drafters borrow from the target (the embedding): hundreds of MB each, and its own torch thread
  pool competing for the cores. Where the drafters' threads do not fit beside the verifier's on
  the machine's cores, all configured drafters share one process (``cosine worker drafter
  --drafter A --drafter B ...``): one copy of the target's embedding, one thread pool, every
  expert queue read by it. Where they fit, each drafter gets a process of its own.
- **Pipelining** (drafting the next round while this one is verified) pays only where drafters
  have cores of their own: on cores the verifier uses, a draft made ahead takes the verifier's
  time (slower at one request on two shared cores: docs/benchmarks.md).

Explicit settings win: ``serve.drafter_processes = "shared" | "separate"`` and
``speculation.pipelining = "on" | "off"``; "auto" (the default) applies the rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MODEL_FREE_KINDS = ("emulated", "prompt-lookup", "suffix")  # drafters that need no torch threads worth counting
UNPROFILED_KINDS = ("prompt-lookup", "suffix")  # drafters that publish no start-up drafting profile (cost next to nothing)
CONTROL_CORES = 1  # router, coordinator and fusion together: mostly waiting on Redis


def machine_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class DeploymentPlan:
    shared_drafters: bool  # every drafter in one process
    pipelining: bool
    reasons: tuple[str, ...]
    # The drafters have compute of their own (cores beside the verifier's; emulated drafters,
    # whatever the cores, stand for GPUs of their own unless emulate.shared_gpus puts them on
    # the verifiers'): cooperating drafters then draft side by side (``SpeculationControl``).
    own_compute: bool = False

    def describe(self) -> str:
        return "; ".join(self.reasons)


def drafter_threads(config) -> int:
    """torch threads the configured drafters want, each in a process of its own."""
    return sum(d.threads for d in config.drafters if d.kind not in MODEL_FREE_KINDS)


def plan_deployment(config, cores: int, verifiers: int = 1) -> DeploymentPlan:
    """Where the drafters run and whether they draft ahead, for ``cores`` cores on this machine
    running ``verifiers`` verifier processes (0: drafters on a machine of their own)."""
    verifier_cores = config.model.threads * verifiers if verifiers else 0
    wanted = drafter_threads(config)
    spare = cores - verifier_cores - (CONTROL_CORES if verifiers else 0)
    reasons = [f"{cores} cores: the verifier takes {verifier_cores}" + (f", the control plane {CONTROL_CORES}" if verifiers else "")]
    choice = config.serve.drafter_processes
    if choice == "auto":
        shared = len(config.drafters) > 1 and spare < wanted
        if shared:
            reasons.append(f"{len(config.drafters)} drafters wanting {wanted} threads do not fit in the {max(0, spare)} cores left: one drafter process hosts them all")
        else:
            reasons.append(f"each drafter in a process of its own ({wanted} threads fit in {max(0, spare)} spare cores)")
    else:
        shared = choice == "shared"
        reasons.append(f"drafters in {'one process' if shared else 'a process each'} (serve.drafter_processes = {choice!r})")
    own = spare >= max(1, wanted if not shared else max((d.threads for d in config.drafters), default=1))
    setting = config.speculation.pipelining
    if setting == "auto":
        pipelining = own
        reasons.append("pipelining on: drafters have cores of their own" if own else "pipelining off: drafters share the verifier's cores (a draft made ahead would take its time)")
    else:
        pipelining = setting == "on"
        reasons.append(f"pipelining {setting} (speculation.pipelining)")
    emulated = bool(config.drafters) and all(d.kind == "emulated" for d in config.drafters)
    return DeploymentPlan(shared, pipelining, tuple(reasons), not config.emulate.shared_gpus if emulated else own)
