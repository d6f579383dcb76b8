"""The deployment plan: drafters share one process and stop drafting ahead where their threads
do not fit beside the verifier's; explicit settings win."""

from __future__ import annotations

from cosine.config import Config, DrafterConfig, EmulateConfig, ModelConfig, ServeConfig, SpeculationConfig, load_config
from cosine.deploy import plan_deployment
from cosine.serve import Supervisor

SIX = (
    *(DrafterConfig(f"{e}-small", "small", e, path="x") for e in ("general", "code", "chat", "math")),
    DrafterConfig("prompt-lookup", "prompt-lookup", "lookup"),
    DrafterConfig("suffix", "suffix", "suffix"),
)


def config(**sections) -> Config:
    return Config(model=ModelConfig(threads=2), drafters=SIX, **sections)


def test_two_cores_host_every_drafter_in_one_process_without_pipelining():
    plan = plan_deployment(config(), cores=2)
    assert plan.shared_drafters and not plan.pipelining
    assert "one drafter process" in plan.describe() and "pipelining off" in plan.describe()


def test_many_cores_give_each_drafter_its_process_and_pipelining():
    plan = plan_deployment(config(), cores=16)
    assert not plan.shared_drafters and plan.pipelining


def test_drafters_have_compute_of_their_own_beside_spare_cores_or_as_emulated_gpus():
    """Cooperation under load follows it: drafters with compute of their own draft side by side."""
    assert not plan_deployment(config(), cores=2).own_compute
    assert plan_deployment(config(), cores=16).own_compute
    emulated = tuple(DrafterConfig(f"d{i}", "emulated", e, profile="llama-68m-2080ti") for i, e in enumerate(("general", "code")))
    assert plan_deployment(Config(model=ModelConfig(threads=2), drafters=emulated), cores=2).own_compute  # a GPU each
    on_verifiers = Config(model=ModelConfig(threads=2), drafters=emulated, emulate=EmulateConfig(shared_gpus=1, gpu_dir="g"))
    assert not plan_deployment(on_verifiers, cores=2).own_compute  # on the verifier's GPU
    assert not plan_deployment(on_verifiers, cores=64).own_compute  # spare cores do not make it a GPU of their own


def test_explicit_settings_win():
    plan = plan_deployment(config(serve=ServeConfig("separate"), speculation=SpeculationConfig(pipelining="on")), cores=2)
    assert not plan.shared_drafters and plan.pipelining
    plan = plan_deployment(config(serve=ServeConfig("shared"), speculation=SpeculationConfig(pipelining=False)), cores=64)
    assert plan.shared_drafters and not plan.pipelining


def test_pipelining_reads_booleans_and_words(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[speculation]\npipelining = false\n")
    assert load_config(path, environ={}).speculation.pipelining == "off"
    assert load_config(path, environ={"COSINE_SPECULATION_PIPELINING": "on"}).speculation.pipelining == "on"


def test_serve_plan_starts_one_drafter_process_for_all_drafters():
    supervisor = Supervisor(config(), "redis://127.0.0.1:1", None)
    supervisor.deployment = plan_deployment(supervisor.config, cores=2)
    drafters = [args for args in supervisor.plan() if args[0] == "drafter"]
    assert drafters == [["drafter", *[a for d in SIX for a in ("--drafter", d.name)]]]
    assert supervisor._worker_env(("drafter",))["COSINE_SPECULATION_PIPELINING"] == "off"
    supervisor.deployment = plan_deployment(supervisor.config, cores=32)
    assert len([args for args in supervisor.plan() if args[0] == "drafter"]) == len(SIX)
    assert supervisor._worker_env(("drafter",))["COSINE_SPECULATION_PIPELINING"] == "on"


def test_workers_get_two_malloc_arenas_unless_the_user_says_otherwise(monkeypatch):
    """Memory: without a bound, glibc's per-thread arenas kept ~90 MB more resident in the drafter
    process after 100 requests."""
    supervisor = Supervisor(config(), "redis://127.0.0.1:1", None)
    supervisor.deployment = plan_deployment(supervisor.config, cores=2)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert all(supervisor._worker_env((role,))["MALLOC_ARENA_MAX"] == "2" for role in ("verifier", "drafter", "router"))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert supervisor._worker_env(("verifier",))["MALLOC_ARENA_MAX"] == "8"
