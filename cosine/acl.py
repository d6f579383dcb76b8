"""Redis ACL rules for a CoSine deployment (docs/operations.md: "Threat model"): what a worker user and a
client user may run, on which keys. The namespace (``redis.namespace``, default ``cosine:``)
prefixes every key pattern.

- **worker**: every key of the namespace; reading, writing, streams, hashes, sorted sets,
  sets, strings, key expiry and renames, and calling the server-side functions (``FCALL``,
  ``FUNCTION LIST``: loading them is ``cosine setup``'s, as an administrator); none of the
  dangerous or administrative commands
  (``FLUSHALL``, ``CONFIG``, ``KEYS``, ``DEBUG``, ``SHUTDOWN``, ``ACL`` ...). What ``cosine
  serve`` needs (it starts every role with one URL).
- **one user per role** (``role_rules``), for workers started with ``cosine worker
  --redis-url``: the worker commands on only the keys that role reads or writes. The
  coordinator's are every key (it applies rounds, sweeps, trims, moves verify streams);
  the router, fusion, drafters and verifiers get their own streams and hashes.
- **gateway** (``gateway_rules``): what ``cosine gateway`` needs — ``XADD`` to every tenant's
  ``requests`` and ``cancel`` and its readers' ``wake:*`` streams, reading every key of the namespace (outputs,
  rosters, metrics, stream groups for ``/metrics``).
- **client**: ``XADD`` to the ``requests`` and ``cancel`` streams and reading ``out:*``
  (``XREAD``, ``XRANGE``, ``XREVRANGE``) — nothing else: no request state, no internal stream.
  A tenant's user (``cosine.tenants``) has the same on its own ``t:{name}:`` keys.

Apply with ``ACL SETUSER name on >password <rules...>`` (``acl_setuser_rules``).
"""

from __future__ import annotations

from cosine.wire.keys import Keys

# Functions are called, never loaded: FCALL and FUNCTION LIST only; not FUNCTION LOAD, DELETE,
# FLUSH or RESTORE (which +@write would allow), nor EVAL or SCRIPT. A worker that could load a
# library could make every other role's next call write whatever it liked; ``cosine setup``
# loads it, as an administrator.
# TIME: the functions read the server's clock (one clock for every process's decisions).
WORKER_COMMANDS = ("-@all", "+@read", "+@write", "+@stream", "+@hash", "+@sortedset", "+@set", "+@string", "+@keyspace",
                   "+@connection", "+@transaction", "-@dangerous", "-@admin", "-@scripting", "+fcall", "+fcall_ro", "+function|list", "+time")
CLIENT_COMMANDS = ("-@all", "+xadd", "+xread", "+xrange", "+xrevrange", "+ping", "+hello", "+auth")


def worker_rules(namespace: str = "cosine:") -> list[str]:
    """ACL rules of the user the workers (and ``cosine serve``'s supervisor) connect as."""
    return ["resetkeys", f"~{namespace}*", "resetchannels", *WORKER_COMMANDS]


# Key patterns, relative to the namespace, made from the key names themselves
# (``cosine.wire.keys``): ``*`` stands for any request id, expert, instance, role or tenant.
_K = Keys("")
_T = _K.tenant_prefix("*")  # any tenant's keys: t:{tenant}:...
# Keys every worker uses: the dead-letter stream, liveness keys and rosters, the stats and
# metrics hashes, the fault-injection phase key (tests).
_COMMON_KEYS = (_K.dead, _K.live_pattern(), _K.roster("*"), _K.stats, _K.metrics, _K.test_phase)
ROLE_KEYS = {
    "router": (_K.requests, _K.cancel, _K.request("*"), _K.out("*"), _K.draft("*"), _K.candidates, _K.rounds, _K.deadlines, _K.reserved,
               _K.waiting, _K.features("*"), _K.tenants, _K.tenant_active("*"), _K.tenant_waiting("*"), f"{_T}*"),
    "fusion": (_K.drafts, _K.draft("*"), _K.fuse("*", "*"), _K.fusing, _K.candidates, _K.request("*"), _T + _K.request("*")),
    "drafter": (_K.draft("*"), _K.drafts, _K.experts, _K.drafter_streams, _K.features("*"), _K.request("*"), _T + _K.features("*"),
                _T + _K.request("*")),
    "verifier": (_K.verify, _K.verify_pattern, _K.verified, _K.verified_pattern, _K.request("*"), _T + _K.request("*"), _K.cost_pattern, _K.fingerprints,
                 _K.verifier_streams),
    "coordinator": ("*",),
}


def role_rules(role: str, namespace: str = "cosine:") -> list[str]:
    """ACL rules of a user for one role's workers: the worker commands, that role's keys."""
    if role not in ROLE_KEYS:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLE_KEYS)}")
    keys = ROLE_KEYS[role] if role == "coordinator" else (*ROLE_KEYS[role], *_COMMON_KEYS)
    return ["resetkeys", *(f"~{namespace}{k}" for k in keys), "resetchannels", *WORKER_COMMANDS]


def client_rules(namespace: str = "cosine:") -> list[str]:
    """ACL rules of a user that may submit, cancel and read outputs, and nothing else."""
    keys = Keys(namespace)
    return ["resetkeys", f"%W~{keys.requests}", f"%W~{keys.cancel}", f"%R~{keys.out('*')}", "resetchannels", *CLIENT_COMMANDS]


GATEWAY_COMMANDS = ("-@all", "+xadd", "+xread", "+xrange", "+xinfo|groups", "+hgetall", "+smembers", "+zcard", "+del", "+pexpire", "+time",
                    "+ping", "+hello", "+auth")


def gateway_rules(namespace: str = "cosine:") -> list[str]:
    """ACL rules of the user an HTTP gateway connects as: submit and cancel, its readers' wake
    streams, and reading the rest (outputs, rosters, metrics, queue depths); nothing else."""
    keys = Keys(namespace)
    return ["resetkeys", f"%R~{namespace}*", f"%W~{keys.requests}", f"%W~{keys.cancel}", f"%W~{keys.requests_of('*')}",
            f"%W~{keys.cancel_of('*')}", f"~{keys.wake('*')}", "resetchannels", *GATEWAY_COMMANDS]


def acl_setuser_rules(password: str, rules: list[str]) -> list[str]:
    """The arguments of ``ACL SETUSER <name>`` after the name: enabled, one password, the rules."""
    return ["reset", "on", f">{password}", *rules]
