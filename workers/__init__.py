"""Pipeline stage workers, one module per stage; installed as ``cosine.workers``.

router -> draft:{expert} -> drafter -> drafts -> fusion -> candidates -> coordinator -> verify
-> verifier -> verified -> coordinator -> out:{id} and the next round.
"""

from __future__ import annotations


def build_worker(role: str, config, redis_url: str, *, expert: str | None = None, drafter_name: str | list[str] | None = None):
    if role == "router":
        from .router import Router

        return Router(config, redis_url)
    if role == "drafter":
        from .drafter import DrafterHost, DrafterWorker

        names = [drafter_name] if isinstance(drafter_name, str) else list(drafter_name or [])
        if len(names) > 1:  # one process hosting several drafters
            if expert is not None:
                raise ValueError("--expert names one drafter's queue; with several --drafter each serves its own expert")
            return DrafterHost(config, redis_url, names)
        drafter_name = names[0] if names else None

        if expert is None:
            spec = next((d for d in config.drafters if drafter_name in (None, d.name)), None)
            if spec is None:
                raise ValueError(f"no configured drafter named {drafter_name!r}")
            expert = spec.expert
        return DrafterWorker(config, redis_url, expert, drafter_name)
    if role == "fusion":
        from .fusion import FusionWorker

        return FusionWorker(config, redis_url)
    if role == "coordinator":
        from .coordinator import Coordinator

        return Coordinator(config, redis_url)
    if role == "verifier":
        from .verifier import VerifierWorker

        return VerifierWorker(config, redis_url)
    raise ValueError(f"unknown role {role!r}")
