"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest

from cosine.embedded import EmbeddedRedis
from tests.integration.harness import Pipeline


@pytest.fixture()
def pipelines():
    """Pipelines a test starts; every worker is stopped afterwards."""
    started: list[Pipeline] = []
    yield started
    for pipeline in started:
        pipeline.stop()


@pytest.fixture()
def embedded_url():
    """A fresh embedded Valkey (no persistence) for one test: its URL."""
    embedded = EmbeddedRedis(persistence=False)
    yield embedded.start()
    embedded.stop()
