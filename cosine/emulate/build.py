"""Emulated parts built from a ``Config`` (its ``[emulate]`` section)."""

from __future__ import annotations

import atexit
import hashlib

from .drafter import EmulatedDrafter
from .gpu import claim_gpu, drafter_gpu
from .oracle import Oracle
from .profiles import Profiles, load_profiles
from .runner import EmulatedRunner
from .timing import Recorder

_recorders: dict[str, Recorder] = {}


def profiles_of(config) -> Profiles:
    return load_profiles(config.emulate.profiles or None)


def recorder(config, name: str) -> Recorder:
    """This process's record of emulated calls named ``name`` (one per name and process)."""
    if name not in _recorders:
        _recorders[name] = Recorder(config.emulate.record_dir, name)
        atexit.register(_recorders[name].flush)  # the calls since the last write (a drained worker exits normally)
    return _recorders[name]


def emulated_target(config, vocab_size: int) -> tuple[EmulatedRunner, str]:
    """The verifier's runner for ``emulate.target``, and the target's fingerprint (a function
    of the profile and the oracle: verifiers of one emulated target share it)."""
    emulate = config.emulate
    profiles = profiles_of(config)
    profile = profiles.target(emulate.target)
    gpu = claim_gpu(emulate.gpu_dir, emulate.shared_gpus) if emulate.shared_gpus else None
    runner = EmulatedRunner(profile, Oracle(emulate.seed), vocab_size, profiles.accuracy(emulate.acceptance).sampling,
                            emulate.slowdown, recorder(config, "target"), gpu)
    fingerprint = hashlib.sha256(f"emulated:{emulate.target}:{emulate.seed}:{vocab_size}".encode()).hexdigest()[:16]
    return runner, fingerprint


def domain_markers(tokenizer, domains) -> dict[int, str]:
    """Each domain's marker: the first token of its name, as a prompt starting with it has."""
    markers: dict[int, str] = {}
    for domain in domains:
        ids = tokenizer.encode(domain, add_special_tokens=False)
        if not ids or ids[0] in markers:
            raise ValueError(f"emulate.domains: {domain!r} needs a first token of its own")
        markers[ids[0]] = domain
    return markers


def emulated_drafter(spec, config, tokenizer) -> EmulatedDrafter:
    emulate = config.emulate
    profiles = profiles_of(config)
    acceptance = profiles.accuracy(emulate.acceptance).scaled(emulate.gap_scale)
    return EmulatedDrafter(spec.name, spec.expert, profiles.drafter(spec.profile), acceptance, Oracle(emulate.seed),
                           domain_markers(tokenizer, emulate.domains), emulate.slowdown, recorder(config, f"drafter-{spec.name}"),
                           drafter_gpu(config, spec.name))


def network_connection(config):
    """The Redis connection class of a drafter host on ``emulate.network`` (None: no delay;
    drafters on the verifiers' GPUs, ``emulate.shared_gpus``, are on the verification server)."""
    if not config.emulate.network or config.emulate.shared_gpus:
        return None
    from .network import delayed_connection

    network = profiles_of(config).network(config.emulate.network)
    return delayed_connection(network, config.emulate.slowdown, recorder(config, "network"))
