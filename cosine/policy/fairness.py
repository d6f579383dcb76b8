"""Which tenant's waiting request starts next: the starts are shared among tenants.

A tenant that bursts hundreds of requests fills the queue before another tenant's few arrive;
first come, first started across tenants would make the latecomer wait for the whole burst.
The next start goes to the tenant with the fewest requests started (running now), among those
with requests waiting; ties go to the oldest waiting request. Within a tenant: first come,
first started. A tenant running fewer requests therefore gets every free slot until it runs as
many as the others (max-min fairness over the slots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def start_order(waiting: Mapping[str, Sequence[tuple[str, float]]], started: Mapping[str, int], limit: int) -> list[str]:
    """Up to ``limit`` waiting request ids in the order they should start, from each tenant's
    queue (``waiting[tenant]``: (request id, arrival), oldest first) and the requests each
    tenant has started (``started``), counting each start as it is planned."""
    heads = {tenant: 0 for tenant, queue in waiting.items() if queue}
    running = {tenant: started.get(tenant, 0) for tenant in heads}
    order: list[str] = []
    while heads and len(order) < limit:
        tenant = min(heads, key=lambda t: (running[t], waiting[t][heads[t]][1], t))
        order.append(waiting[tenant][heads[tenant]][0])
        running[tenant] += 1
        heads[tenant] += 1
        if heads[tenant] >= len(waiting[tenant]):
            del heads[tenant]
    return order
