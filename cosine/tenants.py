"""Tenants: client users of one server that can only hurt themselves.

A tenant is a Redis ACL user that may write its own request and cancel streams and read its own
output streams (``cosine.wire.keys``: ``cosine:t:{name}:...``), and nothing else: a client can
pass ``MAXLEN 0`` or any entry ID to ``XADD`` (an ACL cannot restrict a command's arguments), and
with streams of its own that only ever empties or blocks its own queue. Routers read every
tenant's streams from the registry hash (``Keys.tenants``) that ``cosine tenant`` keeps: no
``SCAN``. The ``default`` tenant is the one without a registry entry: today's key names
(``cosine:requests``, ``cosine:out:{id}``), what a single-user setup and the README's
``redis-cli`` example use.

Bounds per tenant (``[tenants]`` in the config, or the tenant's own from ``cosine tenant add``):
requests admitted at once, unread entries and bytes on its request stream. The pipeline's
bounds stay; starts of waiting requests are shared among the tenants that have some.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from cosine.acl import acl_setuser_rules, client_rules
from cosine.config import TenantsConfig
from cosine.wire.keys import DEFAULT_TENANT, Keys, check_tenant_name


@dataclass(frozen=True, slots=True)
class TenantBounds:
    """A tenant's own bounds (0: the config's ``[tenants]`` value)."""

    max_requests: int = 0
    max_unread: int = 0
    max_stream_mb: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"tenant bound {name} must be an integer >= 0, got {value!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: bytes | str) -> TenantBounds:
        """A registry value; an unreadable one gives the config's bounds (never an error: a
        router must not stop over one bad entry)."""
        try:
            values = json.loads(text)
            return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds in force for one tenant (0: none)."""

    max_requests: int
    max_unread: int
    max_stream_bytes: int


def limits(own: TenantBounds, config: TenantsConfig, pipeline_max_requests: int, tenant_count: int) -> Limits:
    """A tenant's bounds: its own, else the config's; ``max_requests`` 0 in both is half of the
    pipeline's bound. A lone tenant (the default one of a one-user setup) has only the
    pipeline's bounds and a ``max_requests`` set for it: tenants' bounds keep tenants from
    each other."""
    max_requests = own.max_requests or config.max_requests
    if tenant_count <= 1:
        return Limits(max_requests, 0, 0)
    if not max_requests and pipeline_max_requests:
        max_requests = max(1, pipeline_max_requests // 2)
    return Limits(max_requests, own.max_unread or config.max_unread, (own.max_stream_mb or config.max_stream_mb) * 1024 * 1024)


def user_name(tenant: str) -> str:
    """The ACL user of a tenant."""
    return f"cosine-tenant-{tenant}"


def tenant_rules(tenant: str, namespace: str = "cosine:") -> list[str]:
    """ACL rules of a tenant's user: ``XADD`` to its own request and cancel streams, reading its
    own output streams; nothing else."""
    return client_rules(Keys(namespace).tenant_prefix(tenant))


def user_url(admin_url: str, user: str, password: str) -> str:
    """``admin_url`` with another user's credentials."""
    parts = urlsplit(admin_url)
    address = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{address}"))


def add_tenant(client, namespace: str, name: str, bounds: TenantBounds = TenantBounds(), router_group: str | None = None) -> str:
    """Make tenant ``name`` (or give it a new password and bounds): its ACL user, its streams
    with the routers' group, its registry entry. ``client``: a synchronous client of an
    administrator. Returns the new password (shown once)."""
    check_tenant_name(name)
    keys = Keys(namespace)
    password = secrets.token_urlsafe(24)
    client.execute_command("ACL", "SETUSER", user_name(name), *acl_setuser_rules(password, tenant_rules(name, namespace)))
    group = router_group or keys.group("router")
    for stream in (keys.requests_of(name), keys.cancel_of(name)):
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except Exception as error:  # the group is there already
            if "BUSYGROUP" not in str(error):
                raise
    if name != DEFAULT_TENANT:
        client.hset(keys.tenants, name, bounds.to_json())
    return password


def remove_tenant(client, namespace: str, name: str) -> bool:
    """Remove tenant ``name``: its user (its connections are closed), its registry entry and its
    request and cancel streams (entries not read yet are not answered). Requests already
    admitted finish; their outputs expire as usual. False when there was no such tenant."""
    check_tenant_name(name)
    keys = Keys(namespace)
    existed = bool(client.execute_command("ACL", "DELUSER", user_name(name)))
    if name != DEFAULT_TENANT:
        existed |= bool(client.hdel(keys.tenants, name))
        client.delete(keys.requests_of(name), keys.cancel_of(name))
    return existed


def registered(client, namespace: str) -> dict[str, TenantBounds]:
    """The tenants in the registry (not ``default``), with their own bounds."""
    raw = client.hgetall(Keys(namespace).tenants)
    return {name.decode(): TenantBounds.from_json(value) for name, value in sorted(raw.items())}


def _requests_now(client, keys: Keys, names: list[str]) -> dict[str, tuple[int, int]]:
    """Each tenant's requests admitted and waiting now, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.zcard(keys.tenant_active(name))
        pipe.zcard(keys.tenant_waiting(name))
    counts = pipe.execute()
    return {name: (counts[2 * i], counts[2 * i + 1]) for i, name in enumerate(names)}


def tenant_rows(client, config) -> list[dict]:
    """Each tenant (``default`` first) with its bounds in force and its requests now: for
    ``cosine tenant list``."""
    keys = Keys(config.redis.namespace)
    own = registered(client, config.redis.namespace)
    names = [DEFAULT_TENANT, *(n for n in own if n != DEFAULT_TENANT)]
    rows = []
    for name, (admitted, waiting) in _requests_now(client, keys, names).items():
        bound = limits(own.get(name, TenantBounds()), config.tenants, config.pipeline.max_requests, len(names))
        rows.append({"tenant": name, "max_requests": bound.max_requests, "max_unread": bound.max_unread,
                     "max_stream_mb": bound.max_stream_bytes // (1024 * 1024), "admitted": admitted, "waiting": waiting})
    return rows


def tenant_figures(client, namespace: str) -> dict[str, dict]:
    """Per tenant (``default`` first): requests admitted and waiting now, and since the counters
    began, requests ended by finish reason, refusals (``busy``), prompt and generated tokens.
    ``client`` decodes responses."""
    from cosine.metrics import parse_series

    keys = Keys(namespace)
    names = [DEFAULT_TENANT, *sorted(n for n in client.hkeys(keys.tenants) if n != DEFAULT_TENANT)]
    figures = {name: {"admitted": admitted, "waiting": waiting, "requests": {}, "refused_busy": 0, "prompt_tokens": 0, "generated_tokens": 0}
               for name, (admitted, waiting) in _requests_now(client, keys, names).items()}
    for field, value in client.hgetall(keys.metrics).items():
        name, labels = parse_series(field)
        row = figures.get(labels.get("tenant", ""))
        if row is None:
            continue
        if name == "requests":
            reason = labels.get("finish_reason", "")
            row["requests"][reason] = row["requests"].get(reason, 0) + int(float(value))
            row["refused_busy"] += int(float(value)) if labels.get("error_code") == "busy" else 0
        elif name in ("prompt_tokens", "generation_tokens"):
            row["generated_tokens" if name == "generation_tokens" else "prompt_tokens"] += int(float(value))
    return figures
