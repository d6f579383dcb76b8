"""Emulation profiles: what an emulated GPU, drafter, network and drafter accuracy cost or
achieve (pure; read from ``profiles.toml`` or a file of the same shape)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROFILES_FILE = Path(__file__).resolve().parent / "profiles.toml"
GENERAL = "general"  # the expert name of generalist drafters


@dataclass(frozen=True, slots=True)
class TargetProfile:
    """A target on its GPUs, as a roofline: a forward reads the weights and the batch's K/V
    rows, and does two FLOPs per parameter per fed token; whichever takes longer, plus a fixed
    overhead (launches, all-reduces)."""

    name: str
    gpus: int
    params_b: float
    weight_gb: float
    kv_bytes_per_token: int
    hbm_gbps: float
    tflops: float
    mem_efficiency: float
    flops_efficiency: float
    overhead_ms: float
    kv_capacity_tokens: int

    def step_ms(self, batch: int, fed_tokens: int, context_rows: int) -> float:
        """One forward of ``batch`` requests feeding ``fed_tokens`` tokens in all over
        ``context_rows`` cached K/V rows in all."""
        if batch <= 0:
            return 0.0
        memory = (self.weight_gb * 1e9 + self.kv_bytes_per_token * context_rows) / (self.hbm_gbps * 1e9 * self.mem_efficiency)
        compute = 2 * self.params_b * 1e9 * max(1, fed_tokens) / (self.tflops * 1e12 * self.flops_efficiency)
        return self.overhead_ms + 1000 * max(memory, compute)


@dataclass(frozen=True, slots=True)
class DrafterProfile:
    name: str
    token_ms: float
    batch_slope: float

    def job_ms(self, batch: int, window: int) -> float:
        """One drafting call: ``batch`` requests, ``window`` tokens each, token by token."""
        if batch <= 0 or window <= 0:
            return 0.0
        return window * self.token_ms * (1 + self.batch_slope * (batch - 1))


@dataclass(frozen=True, slots=True)
class NetworkProfile:
    name: str
    rtt_ms: float
    gbps: float

    def one_way_s(self, size: int) -> float:
        """Half a round trip plus the bytes' time on the wire."""
        wire = size * 8 / (self.gbps * 1e9) if self.gbps > 0 else 0.0
        return self.rtt_ms / 2000 + wire


@dataclass(frozen=True, slots=True)
class Acceptance:
    """Per-position conditional acceptance of a drafter by how its expertise meets the
    request's domain; ``sampling`` is the oracle's next-token distribution (greedy token first)."""

    name: str
    own: tuple[float, ...]
    general: tuple[float, ...]
    other: tuple[float, ...]
    sampling: tuple[float, ...]

    def scaled(self, gap_scale: float) -> Acceptance:
        """The experts' rows moved from the generalist's by ``gap_scale`` (1: as profiled)."""
        if gap_scale == 1.0:
            return self
        def move(row: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(min(0.98, max(0.0, g + gap_scale * (x - g))) for x, g in zip(row, self.general))

        return Acceptance(self.name, move(self.own), self.general, move(self.other), self.sampling)

    def row(self, expert: str, domain: str) -> tuple[float, ...]:
        if expert == GENERAL:
            return self.general
        return self.own if expert == domain else self.other

    def at(self, expert: str, domain: str, position: int) -> float:
        row = self.row(expert, domain)
        return row[min(position, len(row) - 1)]


@dataclass(frozen=True, slots=True)
class Profiles:
    targets: Mapping[str, TargetProfile]
    drafters: Mapping[str, DrafterProfile]
    networks: Mapping[str, NetworkProfile]
    acceptance: Mapping[str, Acceptance]

    def target(self, name: str) -> TargetProfile:
        return _named(self.targets, name, "target")

    def drafter(self, name: str) -> DrafterProfile:
        return _named(self.drafters, name, "drafter")

    def network(self, name: str) -> NetworkProfile:
        return _named(self.networks, name, "network")

    def accuracy(self, name: str) -> Acceptance:
        return _named(self.acceptance, name, "acceptance")


def _named(table: Mapping, name: str, kind: str):
    if name not in table:
        raise ValueError(f"no emulated {kind} profile named {name!r}; known: {sorted(table)}")
    return table[name]


def load_profiles(path: str | Path | None = None) -> Profiles:
    """The profiles of ``path`` (default: the package's ``profiles.toml``)."""
    with open(path or PROFILES_FILE, "rb") as handle:
        raw = tomllib.load(handle)
    try:
        return Profiles(
            targets={name: TargetProfile(name, **values) for name, values in raw.get("targets", {}).items()},
            drafters={name: DrafterProfile(name, **values) for name, values in raw.get("drafters", {}).items()},
            networks={name: NetworkProfile(name, **values) for name, values in raw.get("networks", {}).items()},
            acceptance={name: Acceptance(name, *(_row(values, key) for key in ("own", "general", "other", "sampling")))
                        for name, values in raw.get("acceptance", {}).items()},
        )
    except TypeError as error:
        raise ValueError(f"emulation profiles {path or PROFILES_FILE}: {error}") from None


def _row(values: Mapping, key: str) -> tuple[float, ...]:
    row = values.get(key)
    if not isinstance(row, Sequence) or not row or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in row):
        raise ValueError(f"acceptance {key} must be a non-empty list of probabilities")
    return tuple(float(x) for x in row)
