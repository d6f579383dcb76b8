"""Typed configuration: ``config.toml``, then ``COSINE_*`` environment variables, then CLI options.

Each section is a frozen dataclass validated on construction (``ValueError`` with the field's
name). Environment variables name a field as ``COSINE_<SECTION>_<FIELD>`` (e.g.
``COSINE_MODEL_DEVICE=cuda``); ``COSINE_CACHE_DIR`` and ``COSINE_REDIS_URL`` are short forms.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEMO_TARGET_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = "~/.cache/cosine"
DRAFTER_KINDS = ("early-exit", "emulated", "feature", "layer-skip", "model", "prompt-lookup", "small", "suffix")
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class ModelConfig:
    target: str = ""  # path, hub id on disk, or GGUF file; empty = the demo target in the cache
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    cache_dir: str = DEFAULT_CACHE_DIR
    # KV-cache budget per model runner, in MiB of allocated buffers. `cosine serve` runs one
    # runner per verifier and per model drafter process, so the default keeps a few of them far
    # below the memory of a small machine (SmolLM2-135M fp32: 45 KiB per token, ~23k tokens).
    kv_cache_mb: int = 1024
    # CPU only: "onednn" runs the linear layers on weights reordered once for oneDNN (on some
    # CPUs a pass over k new tokens then costs about one token's; on others each call carries
    # a fixed overhead that makes decoding slower), "plain" keeps transformers' own layers,
    # "auto" times both at start-up and keeps the faster.
    cpu_linear: str = "auto"

    def __post_init__(self) -> None:
        if self.cpu_linear not in ("auto", "onednn", "plain"):
            raise ValueError(f"model.cpu_linear must be 'auto', 'onednn' or 'plain', got {self.cpu_linear!r}")
        if self.threads < 1:
            raise ValueError(f"model.threads must be >= 1, got {self.threads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"model.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.kv_cache_mb < 16:
            raise ValueError(f"model.kv_cache_mb must be >= 16, got {self.kv_cache_mb}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    @property
    def target_path(self) -> str:
        return self.target or str(self.cache_path / "models" / DEMO_TARGET_FILE)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_mb * 2**20


@dataclass(frozen=True, slots=True)
class DefaultsConfig:
    max_tokens: int = 128
    max_tokens_limit: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ValueError("defaults.max_tokens must be in [1, defaults.max_tokens_limit]")


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    mode: str = "chain"  # "chain": first drafter only; "tree": whole chains fused into a tree; "step": fused step by step (local engine)
    window: int = 4
    min_window: int = 1
    max_window: int = 8
    adaptive_window: bool = True
    # Windows also follow the verifier's load: per round the window (up to the adaptive one)
    # with the most expected tokens per ms by the cost model, 0 when speculation does not pay.
    load_control: bool = True
    max_batch: int = 8
    max_tree_nodes: int = 32
    # Pipelining: a drafter that has just sent a round's draft goes on drafting the next round
    # from it (its own guess of the target's next token, then the window), while the round is
    # verified; when the next round's job comes with exactly that context, the draft is sent at
    # once. Only while the drafter has at most pipelining_max_batch jobs and none waiting.
    # "auto": on where drafters have cores of their own (cosine.deploy); "on" / "off" (or true / false).
    pipelining: str = "auto"
    pipelining_max_batch: int = 4
    # Multi-step rounds: a round without drafts (window 0: speculation does not pay now) decodes
    # up to this many tokens in one verifier job instead of one, so its trip through the
    # pipeline is paid once for several tokens (fewer while other requests' drafts are due).
    # 1: one token per round.
    multi_step: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipelining", _on_off_auto(self.pipelining, "speculation.pipelining"))
        if self.mode not in ("chain", "tree", "step"):
            raise ValueError(f"speculation.mode must be 'chain', 'tree' or 'step', got {self.mode!r}")
        if not 0 <= self.min_window <= self.window <= self.max_window:
            raise ValueError("need 0 <= speculation.min_window <= window <= max_window")
        if self.max_batch < 1 or self.max_tree_nodes < 1 or self.pipelining_max_batch < 1 or self.multi_step < 1:
            raise ValueError("speculation.max_batch, max_tree_nodes, pipelining_max_batch and multi_step must be >= 1")


def _on_off_auto(value: Any, name: str) -> str:
    """A switch that may also be left to the deployment: "auto", "on" or "off" (booleans and
    their usual spellings accepted)."""
    text = str(value).lower()
    if value is True or text in ("on", "true", "1", "yes"):
        return "on"
    if value is False or text in ("off", "false", "0", "no"):
        return "off"
    if text == "auto":
        return "auto"
    raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {value!r}")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    # How `cosine serve` lays out the drafters: "auto" (cosine.deploy: one process for all of
    # them where their threads do not fit beside the verifier's), "shared" (always one process),
    # "separate" (a process per drafter).
    drafter_processes: str = "auto"

    def __post_init__(self) -> None:
        if self.drafter_processes not in ("auto", "shared", "separate"):
            raise ValueError(f"serve.drafter_processes must be 'auto', 'shared' or 'separate', got {self.drafter_processes!r}")


@dataclass(frozen=True, slots=True)
class DrafterConfig:
    name: str
    kind: str
    expert: str = "general"
    layers: int = 2  # early-exit: how many of the target's first layers
    skip: tuple[int, ...] = ()  # layer-skip: the target's layers to leave out
    model: str = ""  # model: path of a small causal LM sharing the target's tokenizer
    max_ngram: int = 3  # prompt-lookup
    max_depth: int = 8  # suffix: longest context suffix remembered
    max_tokens: int = 200_000  # suffix: tokens of history kept per domain (oldest sequences forgotten first)
    path: str = ""  # small: directory made by `cosine distill` (relative: to the working directory, else to the package)
    # torch threads of this drafter's own process under `cosine serve` (the verifier takes
    # model.threads); a drafter and the verifier of one request take turns, so on a small
    # machine the verifier gets every core and a drafter one.
    threads: int = 1
    # small / feature on a CPU: int8 weights (dynamically quantized linears: faster drafting at
    # the same acceptance); false: fp32 (bf16 where the CPU has it). The target is never quantized.
    int8: bool = True
    # emulated (benchmarks and tests only, docs/emulation.md): the drafter's timing profile
    # (emulate.profiles); its expert is its domain ("general": a generalist).
    profile: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every drafter needs a name")
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"drafter {self.name!r}: kind must be one of {DRAFTER_KINDS}, got {self.kind!r}")
        if self.kind == "layer-skip" and not self.skip:
            raise ValueError(f"drafter {self.name!r}: kind 'layer-skip' needs skip = [layer, ...]")
        if self.kind == "model" and not self.model:
            raise ValueError(f"drafter {self.name!r}: kind 'model' needs a model path")
        if self.threads < 1:
            raise ValueError(f"drafter {self.name!r}: threads must be >= 1, got {self.threads}")
        if self.kind == "emulated" and not self.profile:
            raise ValueError(f"drafter {self.name!r}: kind 'emulated' needs profile = a drafter profile of emulate.profiles")
        if self.kind in ("small", "feature") and not self.path:
            raise ValueError(f"drafter {self.name!r}: kind {self.kind!r} needs path = a directory made by `cosine distill`")

    @property
    def resolved_path(self) -> Path:
        path = Path(self.path).expanduser()
        if path.is_absolute() or path.exists():
            return path
        return PACKAGE_DIR / path


def redacted_url(url: str) -> str:
    """The URL with its password masked, for logs and messages; a string that does not parse as
    a URL with a password keeps nothing before its last ``@``."""
    parts = urlsplit(url)
    if parts.password is not None:
        userinfo, _, address = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{address}"))
    if "@" in url and parts.username is None:
        return "***@" + url.rpartition("@")[2]
    return url


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""  # empty = start the embedded valkey-server (CLI) on a free loopback port
    namespace: str = "cosine:"

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis.url must start with redis://, rediss:// or unix://, got {redacted_url(self.url)!r}")
        if not self.namespace or any(c.isspace() for c in self.namespace):
            raise ValueError("redis.namespace must be a non-empty string without spaces")


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    block_ms: int = 500  # XREADGROUP BLOCK
    claim_idle_ms: int = 15_000  # entries idle this long on a dead consumer are reclaimed
    max_deliveries: int = 5  # then the entry goes to the dead-letter stream
    heartbeat_ms: int = 1_000  # liveness keys live 3x this
    batch_wait_ms: int = 100  # coordinator: longest wait for a batch to reach its fair share
    batch_choice: str = "cost"  # cost: first rounds first-come, then by the cost model (docs/architecture.md: Load control); fifo: the oldest first
    batch_latency_weight: float = 0.0  # batch choice: tokens a second of waiting is worth (0: throughput first)
    batch_starve_ms: int = 1_000  # a candidate pooled this long goes in the next batch, whatever it costs
    # A prompt's prefill goes to the verifier this many uncached tokens per batch, so that a long
    # prompt shares batches with decoding requests instead of stalling them; 0: all at once.
    prefill_chunk: int = 128
    # A request's rounds go to the verifier that holds its caches while it is live (its own
    # stream); false: every round to the shared stream, any verifier (the ablation).
    affinity: bool = True
    fusion_deadline_ms: int = 1_500  # fusion: emit with the drafts that arrived by then
    drafter_deadline_ms: int = 5_000  # no draft by then: the round falls back to window 0
    # A round sent to verification with no result applied this long after (a batch or result
    # lost to a fault: a worker or the server killed at the wrong moment) is verified again
    # without drafts, instead of its request waiting for its deadline.
    verify_retry_ms: int = 30_000
    # A request pinned to a target that no live verifier has served for this long ends with
    # error_code=target_gone while another target is served (a retired target after a rolling
    # upgrade; with no verifier live at all, requests wait up to their deadline).
    target_grace_s: float = 30.0
    output_ttl_s: int = 3_600  # finished requests' out: streams and state expire
    trim_interval_s: float = 5.0
    max_prompt_chars: int = 200_000
    deadline_s: float = 600.0  # a request without its own deadline_s ends (error_code=deadline) after this
    # Admission: at most this many requests active at once; past it a new request gets an
    # immediate error final with error_code=busy (0: no bound).
    max_requests: int = 256
    # Admission by memory: the active requests' prompt + max_tokens rows must fit in the live
    # verifiers' K/V pools together (model.kv_cache_mb each), else error_code=busy.
    admission_kv: bool = True
    # Past the bounds above, up to this many requests wait (first come, first started) instead
    # of getting error_code=busy; the wait counts against their deadline (0: refuse at once).
    max_waiting: int = 0
    # Ids are capabilities (whoever knows one reads the output and may cancel): a request
    # without an `id` is refused (invalid, error_param id) rather than answered on out:{entry
    # ID}, which anyone can guess (entry IDs are timestamps). false: the entry ID is its id.
    require_id: bool = True

    def __post_init__(self) -> None:
        if self.max_requests < 0:
            raise ValueError("pipeline.max_requests must be >= 0 (0: no bound)")
        if self.max_waiting < 0:
            raise ValueError("pipeline.max_waiting must be >= 0 (0: refuse at once when full)")
        for name in ("block_ms", "claim_idle_ms", "max_deliveries", "heartbeat_ms", "output_ttl_s", "verify_retry_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"pipeline.{name} must be >= 1")
        if not self.deadline_s > 0:
            raise ValueError("pipeline.deadline_s must be > 0")
        if self.block_ms > 20_000:
            raise ValueError("pipeline.block_ms must be <= 20000 (a blocking read must end before the socket time-out)")
        if self.batch_choice not in ("cost", "fifo"):
            raise ValueError(f"pipeline.batch_choice must be 'cost' or 'fifo', got {self.batch_choice!r}")
        if self.prefill_chunk < 0:
            raise ValueError("pipeline.prefill_chunk must be >= 0 (0: prefill at once)")


@dataclass(frozen=True, slots=True)
class TenantsConfig:
    """Bounds of each tenant (``cosine tenant add`` can set its own); the pipeline's stay."""

    # Requests admitted at once (waiting or started); past it a new one is refused busy. 0: half
    # of pipeline.max_requests while more than one tenant exists, none for the default alone.
    max_requests: int = 0
    # Entries of a tenant's request stream not read yet, and the stream's bytes: past either,
    # the router refuses the oldest unread (busy, without tokenizing) until it is back under
    # (0: no bound). Tenants' bounds keep tenants from each other: the default tenant alone has
    # only the pipeline's (and a max_requests set here).
    max_unread: int = 1_024
    max_stream_mb: int = 64
    refresh_ms: int = 1_000  # routers read the tenant registry this often

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_unread", "max_stream_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"tenants.{name} must be >= 0")
        if self.refresh_ms < 1:
            raise ValueError("tenants.refresh_ms must be >= 1")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    default_experts: tuple[str, ...] = ("general",)
    max_experts: int = 2  # cooperating experts per request
    # expert -> keywords: a prompt mentioning one is routed to that expert too
    keywords: dict = field(default_factory=dict)
    # Online routing (the paper's): per request, each expert's score is the harmonic mean of its
    # drafting confidence and verified consistency (running, weight `decay` per round), started
    # from the cold-start classifier (drafters' profile.safetensors); an expert cooperates while it
    # scores at least cooperate_ratio of the best; below explore_below accepted tokens per round an
    # untried expert gets a turn.
    online: bool = True
    decay: float = 0.3
    explore_below: float = 1.0
    cooperate_ratio: float = 0.6

    def __post_init__(self) -> None:
        if not self.default_experts or self.max_experts < 1:
            raise ValueError("router.default_experts must be non-empty and router.max_experts >= 1")
        for expert, words in self.keywords.items():
            if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"router.keywords.{expert} must be a list of non-empty strings")


@dataclass(frozen=True, slots=True)
class EmulateConfig:
    """Emulated GPUs, for benchmarks and tests only (docs/emulation.md): the verifier runs an
    oracle in place of the target and sleeps for a profiled GPU's time; drafters of kind
    "emulated" do likewise; drafters' Redis round trips pay a profiled network's delay."""

    target: str = ""  # a target profile: the verifier emulates it (empty: the real target model)
    profiles: str = ""  # a TOML file of profiles (empty: the package's cosine/emulate/profiles.toml)
    slowdown: float = 1.0  # every profiled time and delay times this (a machine slower than the cluster)
    network: str = ""  # drafter hosts' network profile (empty: none)
    acceptance: str = "paper"  # the emulated drafters' acceptance table
    gap_scale: float = 1.0  # the experts' acceptance moved from the generalist's by this factor
    seed: int = 0  # the oracle's and the drafters' draws
    domains: tuple[str, ...] = ()  # a prompt starting with one of these words is of that domain
    record_dir: str = ""  # where each process writes its emulated calls' overshoot (empty: nowhere)
    # Drafters on the verifiers' GPUs: emulated drafters share this many GPUs with the verifiers
    # (round robin; a call holds its GPU for its profiled time). 0: each on a GPU of its own.
    shared_gpus: int = 0
    gpu_dir: str = ""  # where the shared GPUs' lock files are (needed with shared_gpus)

    def __post_init__(self) -> None:
        if self.shared_gpus < 0:
            raise ValueError("emulate.shared_gpus must be >= 0")
        if self.shared_gpus and not self.gpu_dir:
            raise ValueError("emulate.shared_gpus needs emulate.gpu_dir (where the shared GPUs' lock files are)")
        if not self.slowdown > 0:
            raise ValueError("emulate.slowdown must be > 0")
        if not self.gap_scale >= 0:
            raise ValueError("emulate.gap_scale must be >= 0")


@dataclass(frozen=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)
    drafters: tuple[DrafterConfig, ...] = (DrafterConfig("prompt-lookup", "prompt-lookup"),)

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some fields of one section changed (CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


_SECTIONS = {
    "model": ModelConfig,
    "redis": RedisConfig,
    "pipeline": PipelineConfig,
    "router": RouterConfig,
    "tenants": TenantsConfig,
    "defaults": DefaultsConfig,
    "speculation": SpeculationConfig,
    "serve": ServeConfig,
    "emulate": EmulateConfig,
}
_SHORT_ENV = {
    "COSINE_CACHE_DIR": ("model", "cache_dir"),
    "COSINE_TARGET": ("model", "target"),
    "COSINE_REDIS_URL": ("redis", "url"),
}


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or ``$COSINE_CONFIG``, or ``./config.toml`` when present), then the env."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("COSINE_CONFIG") or ("config.toml" if Path("config.toml").is_file() else None)
    raw: dict[str, Any] = {}
    if path:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    unknown = set(raw) - set(_SECTIONS) - {"drafters"}
    if unknown:
        raise ValueError(f"unknown config sections: {sorted(unknown)}")
    sections = {name: dict(raw.get(name, {})) for name in _SECTIONS}
    _apply_env(sections, environ)
    built = {name: _build(cls, name, sections[name]) for name, cls in _SECTIONS.items()}
    drafters = tuple(_build(DrafterConfig, "drafters", d) for d in raw.get("drafters", [])) or Config().drafters
    if len({d.name for d in drafters}) != len(drafters):
        raise ValueError("drafter names must be unique")
    return Config(drafters=drafters, **built)


def _apply_env(sections: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    for variable, (section, name) in _SHORT_ENV.items():
        if variable in environ:
            sections[section][name] = environ[variable]
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            variable = f"COSINE_{section}_{f.name}".upper()
            if variable in environ:
                sections[section][f.name] = _parse_env(environ[variable], f.type, variable)


def _parse_env(value: str, annotation: Any, variable: str) -> Any:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
    except ValueError:
        raise ValueError(f"{variable}={value!r} is not a valid {kind}") from None
    return value


def _build(cls, section: str, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys in [{section}]: {sorted(unknown)}")
    for name in ("default_experts", "skip", "domains"):
        if name in values:
            values[name] = tuple(values[name])
    return cls(**values)
