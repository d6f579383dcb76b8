"""bench/emulate.py's systems and cluster (the benchmark's own code, not timed): each system
is the cluster's config with its parts switched as documented, and every config loads."""

import argparse
import sys
from pathlib import Path

import pytest

from cosine.config import load_config
from cosine.emulate.profiles import GENERAL

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import emulate as module

    yield module
    for name in ("emulate", "load", "soak", "common"):
        sys.modules.pop(name, None)


def args(**changes) -> argparse.Namespace:
    values = dict(domains=["code", "math", "chat", "finance"], drafters=16, drafter_profile="llama-68m-2080ti", max_batch=64, speculation=[],
                  target="llama-8b-h100", network="paper", gap_scale=1.0, seed=0, max_tokens=128, config=Path("config.toml"), verifiers=0)
    return argparse.Namespace(**{**values, **changes})


@pytest.mark.parametrize("system", ["cosine", "no-speculation", "vanilla-w3", "specinfer-w2", "cosine-no-routing", "cosine-no-fusion",
                                    "cosine-no-pipelining", "cosine-no-batch-choice", "cosine-no-load-control"])
def test_every_system_is_a_config_that_loads(emulate, tmp_path, system):
    from load import dump_toml

    config = emulate.cluster_config(args(), Path("config.toml"), 2.0, tmp_path, system)
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(config))
    loaded = load_config(path)
    assert len(loaded.drafters) == 16 and loaded.emulate.slowdown == 2.0 and loaded.emulate.target == "llama-8b-h100"
    experts = [d.expert for d in loaded.drafters]
    if system.startswith("vanilla"):
        assert set(experts) == {GENERAL} and loaded.router.max_experts == 1 and not loaded.router.online
        assert loaded.speculation.window == loaded.speculation.max_window == 3 and not loaded.speculation.load_control
    else:
        assert experts.count(GENERAL) == 4 and all(experts.count(d) == 3 for d in ("code", "math", "chat", "finance"))
    if system.startswith("specinfer"):
        assert not loaded.router.online and loaded.router.max_experts == 5 and set(loaded.router.default_experts) == set(experts)
        assert loaded.speculation.pipelining == "off" and not loaded.speculation.adaptive_window
    if system == "cosine":
        assert loaded.router.online and loaded.speculation.load_control and loaded.speculation.pipelining == "on"
    if system == "no-speculation":
        assert loaded.speculation.window == 0


def test_an_unknown_system_is_refused(emulate):
    with pytest.raises(SystemExit, match="unknown system"):
        emulate.system_settings("cosine-no-gpu", ["code"])


def test_a_closed_load_is_probed_at_its_own_concurrency(emulate):
    # 64 concurrent requests probed with 16 measured a 16-request load: the probe chose k = 1 for
    # a load that then ran machine-limited.
    assert emulate.probe_size(128, "closed", 64.0) == 64
    assert emulate.probe_size(8, "closed", 1.0) == 2
    assert emulate.probe_size(32, "closed", 16.0) == 16
    assert emulate.probe_size(64, "poisson", 45.0) == 16


def test_a_machine_limited_run_at_a_probed_slowdown_runs_again_slower(emulate):
    # The probe let k = 1 through at c = 4 and the run overshot by 34%: reported as is, it
    # stood in the table as a machine-limited figure instead of a result at k = 2.
    assert emulate.slowdown_again({"machine_limited": True, "slowdown": 1.0}, probed=True) == 2.0
    assert emulate.slowdown_again({"machine_limited": False, "slowdown": 1.0}, probed=True) is None
    assert emulate.slowdown_again({"machine_limited": True, "slowdown": 2.0}, probed=False) is None  # k given: the run stands
    assert emulate.slowdown_again({"machine_limited": True, "slowdown": emulate.MAX_SLOWDOWN}, probed=True) is None


@pytest.mark.parametrize("system", ["vanilla-w4@verifier", "specinfer-w2@verifier"])
def test_a_system_with_its_drafters_on_the_verifiers_gpus(emulate, tmp_path, system):
    """``@verifier``: each distinct expert of the system once per verifier GPU (drafter i on GPU
    i mod 4: every expert on every GPU), the GPUs shared through lock files, the rest as the
    system on the drafter hosts."""
    from load import dump_toml

    path = tmp_path / "c.toml"
    path.write_text(dump_toml(emulate.cluster_config(args(), Path("config.toml"), 2.0, tmp_path / "records", system)))
    loaded = load_config(path)
    experts = [d.expert for d in loaded.drafters]
    distinct = [GENERAL] if system.startswith("vanilla") else ["code", "math", "chat", "finance", GENERAL]
    assert loaded.emulate.shared_gpus == 4 and loaded.emulate.gpu_dir and len(experts) == 4 * len(distinct)
    for gpu in range(4):
        assert sorted(experts[gpu::4]) == sorted(distinct)
    assert not loaded.router.online and not loaded.speculation.load_control and loaded.speculation.pipelining == "off"
