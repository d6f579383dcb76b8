"""The HTTP gateway: an OpenAI-compatible API that is one more Redis client of the pipeline.

Each HTTP request becomes a ``requests`` entry with a random id (``chatcmpl-…`` / ``cmpl-…``,
128 random bits: the capability to read its output; never in use, so its answer always comes on
``out:{id}``), read by an ``OutputReader`` that reads many requests' streams at once. Any number
of gateways can run beside the workers: a gateway keeps nothing but its Redis connections.

- ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI's request and response
  shapes (``cosine.openai_api``), ``stream: true`` as server-sent events.
- ``GET /v1/models``, ``GET /health`` (the gateway and its Redis), ``GET /ready`` (a router, a
  coordinator and a verifier live; drafters are optional), ``GET /metrics`` (Prometheus: the
  whole pipeline's counters, kept in Redis by the workers, ``cosine.metrics``).
- A client that disconnects cancels its request (``XADD cancel``), streaming or not.
- Optional API keys (``Authorization: Bearer …``, compared in constant time) on ``/v1/``.
"""

from .reader import REDIS_TIMEOUT_S, Listener, OutputReader, redis_failure
from .server import KEYS_FILE_CHECK_S, Gateway, GatewaySettings, default_model_name, read_api_keys

__all__ = ["KEYS_FILE_CHECK_S", "REDIS_TIMEOUT_S", "Gateway", "GatewaySettings", "Listener", "OutputReader", "default_model_name", "read_api_keys", "redis_failure"]
