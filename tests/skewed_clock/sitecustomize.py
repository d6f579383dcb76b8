"""A host whose wall clock is wrong, for a whole process: with this directory on PYTHONPATH,
Python imports this module at start-up, before anything else, and ``time.time`` and
``time.time_ns`` run ``COSINE_TEST_CLOCK_SKEW_S`` seconds off (``time.monotonic``, which a
wrong wall clock does not change, is left alone). Used by the tests of "one clock"."""

import os
import time

_SKEW_S = float(os.environ.get("COSINE_TEST_CLOCK_SKEW_S") or 0)

if _SKEW_S:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _SKEW_S
    time.time_ns = lambda: _time_ns() + int(_SKEW_S * 1e9)
