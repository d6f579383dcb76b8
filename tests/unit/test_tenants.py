"""Tenants without a server: key names, ids, bounds, the API keys file, fair starts."""

from __future__ import annotations

import pytest

from cosine.config import TenantsConfig
from cosine.gateway import read_api_keys
from cosine.policy.fairness import start_order
from cosine.tenants import Limits, TenantBounds, limits, tenant_rules, user_url
from cosine.wire import Keys
from cosine.wire.keys import DEFAULT_TENANT, check_tenant_name, qualify, split_id

KEYS = Keys()


def test_the_default_tenant_keeps_todays_key_names():
    assert qualify(DEFAULT_TENANT, "r1") == "r1"
    assert (KEYS.requests_of(DEFAULT_TENANT), KEYS.cancel_of(DEFAULT_TENANT)) == ("cosine:requests", "cosine:cancel")
    assert (KEYS.out("r1"), KEYS.request("r1"), KEYS.features("r1")) == ("cosine:out:r1", "cosine:req:r1", "cosine:feat:r1")


def test_every_per_request_key_of_a_tenant_names_it():
    request_id = qualify("acme", "r1")
    assert split_id(request_id) == ("acme", "r1")
    assert KEYS.requests_of("acme") == "cosine:t:acme:requests" and KEYS.cancel_of("acme") == "cosine:t:acme:cancel"
    assert (KEYS.out(request_id), KEYS.request(request_id), KEYS.features(request_id)) == (
        "cosine:t:acme:out:r1", "cosine:t:acme:req:r1", "cosine:t:acme:feat:r1")
    # Ids are the client's, whatever they hold: one tenant's id never names another's keys.
    assert KEYS.out(qualify("acme", "t:other:out:x")) == "cosine:t:acme:out:t:other:out:x"
    assert split_id(qualify("acme", "{other}r1")) == ("acme", "{other}r1")


def test_a_tenants_user_may_touch_only_its_own_client_keys():
    rules = tenant_rules("acme")
    assert "%W~cosine:t:acme:requests" in rules and "%W~cosine:t:acme:cancel" in rules and "%R~cosine:t:acme:out:*" in rules
    assert not [r for r in rules if "~" in r and "t:acme:" not in r]


@pytest.mark.parametrize("name", ["", "Acme", "a b", "a:b", "{a}", "-a", "a" * 33])
def test_tenant_names_are_checked(name):
    with pytest.raises(ValueError):
        check_tenant_name(name)


def test_bounds_in_force():
    config = TenantsConfig()
    assert limits(TenantBounds(), config, 256, 1) == Limits(0, 0, 0)  # the default tenant alone: the server's bounds only
    assert limits(TenantBounds(), config, 256, 3).max_requests == 128  # half of the server's with others
    assert limits(TenantBounds(max_requests=10), config, 256, 3).max_requests == 10
    own = limits(TenantBounds(max_unread=5, max_stream_mb=2), config, 256, 2)
    assert (own.max_unread, own.max_stream_bytes) == (5, 2 * 1024 * 1024)
    assert TenantBounds.from_json('{"max_requests": 4}') == TenantBounds(max_requests=4)
    assert TenantBounds.from_json("not json") == TenantBounds() == TenantBounds.from_json('{"max_requests": -1}')


def test_a_tenants_url_is_the_admins_with_its_own_user():
    assert user_url("redis://:admin@127.0.0.1:6380/0", "cosine-tenant-a", "p/w") == "redis://cosine-tenant-a:p%2Fw@127.0.0.1:6380/0"
    assert user_url("rediss://127.0.0.1:6380/?ssl_ca_certs=/x", "u", "p") == "rediss://u:p@127.0.0.1:6380/?ssl_ca_certs=/x"


def test_the_api_keys_file_maps_keys_to_tenants(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# keys\nk1\nk2 acme\n\n  k3   beta  \n")
    assert read_api_keys(path, ["k0"]) == {"k0": DEFAULT_TENANT, "k1": DEFAULT_TENANT, "k2": "acme", "k3": "beta"}
    path.write_text("k1 acme extra\n")
    with pytest.raises(ValueError, match="keys:1"):
        read_api_keys(path)
    path.write_text("k1 Not-A-Tenant\n")
    with pytest.raises(ValueError, match="keys:1"):
        read_api_keys(path)


def test_starts_go_to_the_tenant_running_fewest_first_come_within_one():
    burst = [(f"a{i}", float(i)) for i in range(200)]
    few = [(f"b{i}", 1000.0 + i) for i in range(5)]
    # A runs 4, B none: B's five go first, then A's in order.
    assert start_order({"a": burst, "b": few}, {"a": 4, "b": 0}, 7) == ["b0", "b1", "b2", "b3", "a0", "b4", "a1"]
    # Equal running: the oldest waiting first.
    assert start_order({"a": burst, "b": few}, {"a": 1, "b": 1}, 3) == ["a0", "b0", "a1"]
    # First come, first started when one tenant waits alone (today's order).
    assert start_order({"a": burst[:3], "b": []}, {"a": 9}, 16) == ["a0", "a1", "a2"]
