"""Regression tests (pure) for defects of "the pipeline stays up": each fails without its fix."""

from __future__ import annotations

import math

import pytest

from cosine.bus import trim_floor
from cosine.config import Config
from cosine.core.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, RequestError, parse_stop, sampling_params
from cosine.core.sampling import SamplingParams
from cosine.models.loading import _directory_hash
from cosine.wire import Candidate, Keys, VerifyBatch, VerifyItem
from cosine.wire.state import state_from_fields


def test_trim_floor_when_pending_was_acknowledged_meanwhile():
    # XINFO said "pending 1", then the entry was acknowledged: XPENDING's oldest entry is None.
    # The coordinator died of int('None') here.
    assert trim_floor([(b"1700000000000-4", None)]) == b"1700000000000-5"


def test_trim_floor_keeps_the_oldest_pending_entry_of_any_group():
    groups = [(b"1700000000500-0", b"1700000000100-3"), (b"1700000000900-1", None)]
    assert trim_floor(groups) == b"1700000000100-3"
    assert trim_floor([(b"5-2", None), (b"3-0", None)]) == b"3-1"  # the group that read least


def test_trim_floor_without_groups_trims_nothing():
    assert trim_floor([]) is None


def test_stop_strings_are_bounded_in_count_and_length():
    assert parse_stop('["a", "b"]') == ("a", "b")
    assert parse_stop("x" * MAX_STOP_CHARS) == ("x" * MAX_STOP_CHARS,)
    with pytest.raises(RequestError) as too_long:
        parse_stop(["x" * (MAX_STOP_CHARS + 1)])
    assert too_long.value.param == "stop"
    with pytest.raises(RequestError):
        parse_stop([str(i) for i in range(MAX_STOP_STRINGS + 1)])


def test_unseeded_requests_get_distinct_random_seeds():
    seeds = {sampling_params(0.8, 0.95).seed for _ in range(8)}
    assert len(seeds) == 8  # never all 0: identical prompts must not give identical samples
    assert sampling_params(0.8, 0.95, "7").seed == 7


@pytest.mark.parametrize(("field", "value"), [("temperature", "nan"), ("top_p", "inf"), ("seed", "1e400"), ("temperature", "hot")])
def test_bad_numbers_name_their_field(field, value):
    args = {"temperature": 0.5, "top_p": 1.0, "seed": 1, field: value}
    with pytest.raises(RequestError) as error:
        sampling_params(**args)
    assert error.value.param == field and error.value.code == "invalid"


def test_fingerprint_hashes_weights_not_names_and_sizes(tmp_path):
    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for directory, byte in ((first, b"\x01"), (second, b"\x02")):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(byte * 4096)
        (directory / "config.json").write_text("{}")
    assert _directory_hash(first) != _directory_hash(second)
    assert _directory_hash(first) == _directory_hash(first)


def _item(request_id: str, fingerprint: str) -> VerifyItem:
    return VerifyItem(request_id, 3, [1, 2], Candidate(request_id, 3, [], [], [], [], []), SamplingParams(), fingerprint)


def test_a_verifier_hands_foreign_rounds_to_their_own_target():
    from cosine.workers.verifier import VerifierWorker

    worker = VerifierWorker(Config(), "redis://127.0.0.1:1")
    worker.fingerprint = "mine"
    batch = VerifyBatch("b1", [_item("ours", "mine"), _item("theirs", "other"), _item("new", "")])
    handed = worker._hand_on_foreign(batch)
    assert [stream for stream, _ in handed] == [Keys().verify_for("other")]
    assert Keys().verify_for("other") != Keys().verify_for("mine")


def test_a_refused_requests_tombstone_is_not_a_state():
    assert state_from_fields({b"source": b"1-0", b"status": b"finished", b"round": b"-1"}) is None


def test_fault_points_parse_and_fire(monkeypatch):
    from cosine import faults

    points = faults._parse("verifier.forward=raise:poison; coordinator.after_apply=sleep:0.25")
    monkeypatch.setattr(faults, "_POINTS", points)
    assert faults.enabled() and math.isclose(faults.delay("coordinator.after_apply"), 0.25)
    faults.check("verifier.forward", "healthy-request")
    with pytest.raises(faults.InjectedFault):
        faults.check("verifier.forward", "a-poison-request")
    with pytest.raises(ValueError):
        faults._parse("verifier.forward=explode")


def test_every_stage_logs_under_its_own_name(caplog):
    """Regression: every worker logged as cosine.workers.base, so a line did not say its stage."""
    import logging

    from cosine.workers.fusion import FusionWorker
    from cosine.workers.router import Router

    names = {FusionWorker(Config(), "redis://127.0.0.1:1").log.name, Router(Config(), "redis://127.0.0.1:1").log.name}
    assert names == {"cosine.workers.fusion", "cosine.workers.router"}
    with caplog.at_level(logging.INFO):
        FusionWorker(Config(), "redis://127.0.0.1:1").log.info("hello")
    assert caplog.records[-1].name == "cosine.workers.fusion"


def test_the_server_clock_is_this_hosts_clock_plus_the_offset_measured_mid_call(monkeypatch):
    import time

    from cosine.clock import ServerClock

    clock = ServerClock()
    clock.observe(1000.0, 1000.002, (1010, 1000))  # the server read its clock 10 s ahead, mid-call
    assert abs(clock.offset_s - 10.0) < 1e-9 and clock.synced
    clock.observe(1001.0, 1003.0, (5000, 0))  # a reply stalled for 2 s says little: kept out
    assert abs(clock.offset_s - 10.0) < 1e-9
    clock.observe(1002.0, 1002.001, (992, 500))  # this host's clock stepped: the next beat follows
    assert abs(clock.offset_s + 10.0) < 1e-9
    monkeypatch.setattr(time, "time", lambda: 2000.0)
    assert clock.now() == 1990.0 and clock.now_ms() == 1_990_000
