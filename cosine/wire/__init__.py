"""One place for the message formats: stream and key names (``keys``), the internal messages
between stages and their msgpack encoding (``messages``), the request hash (``state``) and
conversions between messages and the core's objects (``convert``). The client-facing output
entries are ``cosine.core.protocol``'s. Lua function argument layouts live with the calls in ``cosine.bus``.
"""

from cosine.wire.keys import Keys
from cosine.wire.messages import (
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    PAYLOAD_FIELD,
    SCHEMA_VERSION,
    Candidate,
    Draft,
    DraftJob,
    VerifiedBatch,
    VerifiedItem,
    VerifyBatch,
    VerifyItem,
    WireError,
    decode,
    encode,
    rounds_in,
)

__all__ = [
    "MAX_PAYLOAD_BYTES", "MESSAGE_TYPES", "PAYLOAD_FIELD", "SCHEMA_VERSION", "Candidate", "Draft", "DraftJob", "Keys",
    "VerifiedBatch", "VerifiedItem", "VerifyBatch", "VerifyItem", "WireError", "decode", "encode", "rounds_in",
]
