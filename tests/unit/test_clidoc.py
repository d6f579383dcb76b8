"""docs/cli.md is the typer app's CLI reference: regenerate it with `python -m cosine.clidoc --write`."""

from __future__ import annotations

from pathlib import Path

from cosine.clidoc import readme_section, reference

README = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_the_readme_cli_reference_matches_the_app():
    assert readme_section(README.read_text()) == reference(), "run `python -m cosine.clidoc --write`"


def test_the_reference_names_every_command_and_option():
    text = reference()
    for command in ("cosine serve", "cosine gateway", "cosine worker", "cosine status", "cosine dead replay", "cosine models pull"):
        assert f"#### `{command}`" in text
    assert "`--http-port`" in text and "`--api-key-file`" in text and "`--watch`, `-w`" in text
