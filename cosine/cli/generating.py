"""``cosine generate``: one completion, through the pipeline or the local engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cosine.config import Config

from .common import ConfigOption, app, client_url, configure, warn_secret_argument


@app.command()
def generate(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="raw text prompt (completion)"),
    messages: str | None = typer.Option(None, "--messages", "-m", help='chat messages as JSON: [{"role":"user","content":"..."}]'),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="default: defaults.max_tokens"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed", help="default: a random seed (recorded in the request state)"),
    stop: str | None = typer.Option(None, "--stop", help="JSON list of stop strings"),
    engine: str = typer.Option("pipeline", "--engine", help="pipeline: submit to a running server over Redis; local: the in-process reference engine"),
    redis_url: str | None = typer.Option(None, "--redis-url", help="server to submit to (default: $COSINE_REDIS_URL, else the URL `cosine serve` wrote)", callback=warn_secret_argument),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds without output before giving up (pipeline)"),
    expert: str | None = typer.Option(None, "--expert", help="pin the request to this expert's drafters"),
    mode: str | None = typer.Option(None, "--mode", help="chain, tree or step (default: speculation.mode)"),
    drafter: list[str] | None = typer.Option(None, "--drafter", "-d", help="use only these configured drafters"),
    window: int | None = typer.Option(None, "--window", help="initial speculation window"),
    as_json: bool = typer.Option(False, "--json", help="print the final entry as JSON on the last line"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Generate one completion and stream it to stdout."""
    from cosine.core.protocol import ClientRequest, RequestError, RequestLimits, eos_token_ids
    from cosine.engine import GenerationRequest, build_engine
    from cosine.factory import build_stack

    config = configure(config_path, verbose)
    if engine not in ("pipeline", "local"):
        raise typer.BadParameter("engine must be 'pipeline' or 'local'", param_hint="--engine")
    given = {"prompt": prompt, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
             "seed": seed, "stop": stop, "expert": expert}
    fields = {name: str(value) for name, value in given.items() if value is not None}
    try:  # the router's own checks, before anything loads or is sent
        request = ClientRequest.from_fields(fields, RequestLimits.of(config))
    except RequestError as error:
        raise typer.BadParameter(str(error), param_hint=f"--{error.param.replace('_', '-')}" if error.param else None) from None
    if engine == "pipeline":
        _generate_pipeline(config, redis_url, timeout, as_json, fields)
        return
    config = config.replace("speculation", mode=mode, window=window)
    if window is not None and window > config.speculation.max_window:
        config = config.replace("speculation", max_window=window)
    stack = build_stack(config, drafter)
    tokenizer = stack.target.tokenizer
    pinned = None
    if expert is not None:  # the local engine routes over drafters: the expert's first one
        loaded = {d.name for d in stack.drafters}
        pinned = next((d.name for d in config.drafters if d.expert == expert and d.name in loaded), None)
        if pinned is None:
            raise typer.BadParameter(f"no loaded drafter of expert {expert!r}", param_hint="--expert")
    try:
        local_request = GenerationRequest(
            "cli", tuple(request.token_ids(tokenizer)), request.sampling, request.stop_rules(eos_token_ids(tokenizer, stack.target.model.config)), pinned,
        )
    except RequestError as error:
        raise typer.BadParameter(str(error)) from None
    local = build_engine(config, stack)

    def stream(_: str, tokens) -> None:
        if not as_json:
            sys.stdout.write(tokens.text)
            sys.stdout.flush()

    result = local.generate([local_request], on_emission=stream)[0]
    _print_final(result, result.request_id, as_json, result.seconds)


def _generate_pipeline(config: Config, redis_url: str | None, timeout: float, as_json: bool, fields: dict[str, str]) -> None:
    from cosine.client import Client

    url = client_url(config, redis_url)
    with Client(url, config.redis.namespace, timeout=timeout) as client:
        try:
            request_id = client.submit(**fields)
            final = None
            for piece in client.read(request_id):
                if piece.type == "final":
                    final = piece.final
                elif not as_json:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
        except TimeoutError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
    _print_final(final, request_id, as_json)


def _print_final(final, request_id: str, as_json: bool, seconds: float | None = None) -> None:
    """A generated request's end, alike for both engines: its final entry as JSON (``--json``),
    else a summary on stderr; exit 1 when it ended in an error."""
    if as_json:
        typer.echo(json.dumps({"type": "final", "id": request_id, **final.to_json()}, ensure_ascii=False))
    else:
        typer.echo()
        if final.error:
            typer.echo(f"error: {final.error}", err=True)
        timing = f", {seconds:.2f}s" if seconds is not None else ""
        typer.echo(
            f"[{final.finish_reason}] {final.generated_tokens} tokens in {final.rounds} rounds, "
            f"{final.accepted_tokens}/{final.draft_tokens} drafted tokens accepted{timing}",
            err=True,
        )
    if final.finish_reason == "error":
        raise typer.Exit(1)
