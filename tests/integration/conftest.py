"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest

from tests.integration.harness import Pipeline


@pytest.fixture()
def pipelines():
    """Pipelines a test starts; every worker is stopped afterwards."""
    started: list[Pipeline] = []
    yield started
    for pipeline in started:
        pipeline.stop()
