"""``cosine status``: queue depths, pending entries, live workers, counters, worker restarts."""

from __future__ import annotations

import redis

from cosine.wire import Keys


def read_status(url: str, namespace: str) -> dict:
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys(namespace)
    try:
        streams = [keys.requests, keys.cancel, keys.drafts, keys.candidates, keys.verify, keys.verified, keys.dead]
        streams += [keys.draft(e) for e in sorted(client.smembers(keys.experts))]
        streams += [keys.verify_for(f) for f in sorted(client.smembers(keys.fingerprints))]
        streams += [keys.verify_at(i) for i in sorted(client.smembers(keys.verifier_streams))]
        report: dict = {"streams": {}, "workers": {}, "stats": client.hgetall(keys.stats), "restarts": read_restarts(client, keys)}
        for stream in streams:
            if not client.exists(stream):
                continue
            groups = [
                {"group": g["name"], "pending": g["pending"], "lag": g.get("lag"), "consumers": g["consumers"]}
                for g in client.xinfo_groups(stream)
            ]
            report["streams"][stream.removeprefix(namespace)] = {"length": client.xlen(stream), "groups": groups}
        for key in client.scan_iter(match=keys.live_pattern(), count=1000):
            _, role, instance = key.removeprefix(namespace).split(":", 2)
            report["workers"].setdefault(role, []).append(instance)
        return report
    finally:
        client.close()


def read_restarts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Worker restarts per role, counted by ``cosine serve`` supervisors."""
    return {role: int(count) for role, count in sorted(client.hgetall(keys.restarts).items())}
