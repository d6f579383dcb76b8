"""The ``cosine`` command line: one Typer app (``common.app``) whose commands live by topic
(``generating``, ``running``, ``admin``, ``models``); importing this package registers them."""

from __future__ import annotations

from . import admin, generating, models, running  # noqa: F401 (each registers its commands on the app)
from .common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
