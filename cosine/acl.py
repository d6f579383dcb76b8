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


# Keys every worker uses: the dead-letter stream, liveness keys and rosters, the stats hash,
# the fault-injection phase key (tests).
_COMMON_KEYS = ("dead", "live:*", "roster:*", "stats", "metrics", "test:phase")
ROLE_KEYS = {
    "router": ("requests", "cancel", "req:*", "out:*", "draft:*", "candidates", "rounds", "deadlines", "reserved", "waiting", "feat:*",
               "tenants", "tenant:*", "t:*"),
    "fusion": ("drafts", "draft:*", "fuse:*", "fusing", "candidates", "req:*", "t:*:req:*"),
    "drafter": ("draft:*", "drafts", "experts", "drafter-streams", "feat:*", "req:*", "t:*:feat:*", "t:*:req:*"),
    "verifier": ("verify", "verify:*", "verified", "req:*", "t:*:req:*", "cost:*", "fingerprints", "verifier-streams"),
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
    return ["resetkeys", f"%W~{namespace}requests", f"%W~{namespace}cancel", f"%R~{namespace}out:*", "resetchannels", *CLIENT_COMMANDS]


GATEWAY_COMMANDS = ("-@all", "+xadd", "+xread", "+xrange", "+xinfo|groups", "+hgetall", "+smembers", "+zcard", "+del", "+pexpire", "+time",
                    "+ping", "+hello", "+auth")


def gateway_rules(namespace: str = "cosine:") -> list[str]:
    """ACL rules of the user an HTTP gateway connects as: submit and cancel, its readers' wake
    streams, and reading the rest (outputs, rosters, metrics, queue depths); nothing else."""
    return ["resetkeys", f"%R~{namespace}*", f"%W~{namespace}requests", f"%W~{namespace}cancel", f"%W~{namespace}t:*:requests",
            f"%W~{namespace}t:*:cancel", f"~{namespace}wake:*", "resetchannels", *GATEWAY_COMMANDS]


def acl_setuser_rules(password: str, rules: list[str]) -> list[str]:
    """The arguments of ``ACL SETUSER <name>`` after the name: enabled, one password, the rules."""
    return ["reset", "on", f">{password}", *rules]
