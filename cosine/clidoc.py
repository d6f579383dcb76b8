"""The CLI reference (docs/cli.md), made from the typer app itself (a test keeps the two equal).

    python -m cosine.clidoc            # print the reference
    python -m cosine.clidoc --write    # replace it in docs/cli.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def _commands(command, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], object]]:
    # Typer bundles its own click: its classes are told apart by what they have.
    if getattr(command, "commands", None) is not None:
        found = []
        for name in sorted(command.commands):
            found += _commands(command.commands[name], (*path, name))
        return found
    return [(path, command)]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    from cosine.cli import app

    root = typer.main.get_command(app)
    lines = []
    for path, command in _commands(root, ("cosine",)):
        lines += [f"#### `{' '.join(path)}`", ""]
        summary = (command.help or "").strip().split("\n\n")[0]
        if summary:
            lines += [_cell(summary), ""]
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        if arguments:
            lines.append("Arguments: " + ", ".join(f"`{(a.metavar or a.name).upper()}`" + (f" ({_cell(a.help)})" if getattr(a, "help", None) else "") for a in arguments) + ".")
            lines.append("")
        if options:
            lines += ["| option | default | |", "|---|---|---|"]
            for option in options:
                names = ", ".join(f"`{n}`" for n in (*option.opts, *option.secondary_opts))
                default = "" if option.default in (None, False, ()) or option.is_flag and not option.default else f"`{option.default}`"
                if option.multiple:
                    default = "repeatable"
                lines.append(f"| {names} | {default} | {_cell(option.help or '')} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def readme_section(readme: str) -> str:
    """The reference as docs/cli.md holds it (between the markers)."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[start:end].strip("\n") + "\n"


def main() -> None:
    text = reference()
    if "--write" not in sys.argv[1:]:
        sys.stdout.write(text)
        return
    path = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    readme = path.read_text()
    start, end = readme.index(START) + len(START), readme.index(END)
    path.write_text(readme[:start] + "\n" + text + readme[end:])


if __name__ == "__main__":
    main()
