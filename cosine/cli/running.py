"""Running the system: ``cosine worker``, ``serve``, ``gateway``, ``status``, ``demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import typer

from cosine.config import redacted_url
from cosine.wire.keys import ROLES

from .common import (
    ConfigOption,
    RedisUrlOption,
    admin_url_file,
    app,
    client_url,
    configure,
    url_file,
    warn_secret_argument,
    write_private,
)


@app.command()
def worker(
    role: str = typer.Argument(..., help="router | drafter | fusion | coordinator | verifier"),
    expert: str | None = typer.Option(None, "--expert", help="drafter: the expert queue to serve"),
    drafter_name: list[str] = typer.Option([], "--drafter", help="drafter: which configured drafter (default: the expert's first); repeat it to host several drafters in one process, each on its own expert's queue"),
    redis_url: str | None = typer.Option(None, "--redis-url", help="default: $COSINE_REDIS_URL or redis.url", callback=warn_secret_argument),
    burst: bool = typer.Option(False, "--burst", help="exit when the input streams are empty (tests)"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one pipeline stage; start several on any machine that reaches the Redis to scale out.

    Exits with code 3 when it cannot start (bad config, missing model): `cosine serve` then
    stops instead of restarting it forever.
    """
    from cosine.workers.base import StartupError, run_worker

    try:
        stage = _build_stage(role, expert, drafter_name, redis_url, config_path, verbose)
    except (typer.BadParameter, ValueError) as error:
        _startup_failed(role, error)
    try:
        run_worker(stage, burst=burst)
    except StartupError as error:
        _startup_failed(role, error)


def _build_stage(role: str, expert: str | None, drafter_name: list[str], redis_url: str | None, config_path: Path | None, verbose: bool):
    from cosine.workers import build_worker

    config = configure(config_path, verbose)
    url = redis_url or config.redis.url
    if not url:
        raise typer.BadParameter("a worker needs --redis-url or COSINE_REDIS_URL")
    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}", param_hint="ROLE")
    return build_worker(role, config, url, expert=expert, drafter_name=drafter_name)


def _startup_failed(role: str, error: Exception) -> NoReturn:
    from cosine.serve import STARTUP_FAILED
    from cosine.workers.base import StartupError

    if isinstance(error, StartupError):  # its message already names the role
        typer.echo(f"error: {error}", err=True)
    else:
        message = error.format_message() if isinstance(error, typer.BadParameter) else str(error)
        typer.echo(f"error: the {role} worker cannot start: {message}", err=True)
    raise typer.Exit(STARTUP_FAILED)


@app.command()
def serve(
    redis_url: str | None = typer.Option(None, "--redis-url", help="use this server instead of the embedded one", callback=warn_secret_argument),
    verifiers: int = typer.Option(1, "--verifiers", min=0, help="verifier processes"),
    drafters_per_expert: int = typer.Option(1, "--drafters", min=0, help="processes per configured drafter (or per drafter process, where one hosts them all)"),
    replicas: int = typer.Option(1, "--replicas", min=0, help="processes of each of router, coordinator and fusion"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="embedded server: its data directory (default: a fresh temporary one, removed at stop)"),
    fsync: str = typer.Option("everysec", "--fsync", help="embedded server: appendfsync policy of its append-only file (always | everysec | no)"),
    http_port: int | None = typer.Option(None, "--http-port", min=0, max=65535, help="also run the HTTP gateway (cosine gateway) on this port"),
    http_host: str = typer.Option("127.0.0.1", "--http-host", help="the gateway's address"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start every stage (and the embedded Redis when no URL is given) and keep them running
    until Ctrl-C or SIGTERM."""
    from cosine.serve import Supervisor, SupervisorError

    config = configure(config_path, verbose)
    try:
        supervisor = Supervisor(config, redis_url or config.redis.url or None, config_path, verifiers, drafters_per_expert, verbose,
                                replicas=replicas, data_dir=data_dir, fsync=fsync,
                                gateway=None if http_port is None else ("--port", str(http_port), "--host", http_host))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(supervisor.describe(), err=True)
    try:
        supervisor.start()
        write_private(url_file(config), supervisor.client_url + "\n")
        where = f"URL in {url_file(config)}"
        if supervisor.client_url != supervisor.url:  # its own users: the administrator's URL apart
            write_private(admin_url_file(config), supervisor.url + "\n")
            where = f"clients' URL in {url_file(config)}, the administrator's in {admin_url_file(config)}"
        else:  # one URL for all: none of an earlier serve's left to mislead `cosine status`
            admin_url_file(config).unlink(missing_ok=True)
        typer.echo(f"cosine serving on {redacted_url(supervisor.client_url)} (namespace {config.redis.namespace!r}; {where}); Ctrl-C to stop", err=True)
        supervisor.wait()
    except SupervisorError as error:
        typer.echo(f"error: {error}; stopping", err=True)
        raise typer.Exit(1) from None
    finally:
        supervisor.stop()
        for path, url in ((url_file(config), supervisor.client_url), (admin_url_file(config), supervisor.url)):
            if url and path.is_file() and path.read_text().strip() == url:
                path.unlink()


@app.command()
def gateway(
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    served_model_name: list[str] = typer.Option([], "--served-model-name", help="model names /v1/models lists and requests may ask for (default: the target's name)"),
    api_key: list[str] = typer.Option([], "--api-key", envvar="COSINE_API_KEY", help="require this key (Authorization: Bearer ...); repeatable", callback=warn_secret_argument),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="a file of API keys: `KEY` or `KEY TENANT` lines, read again when it changes"),
    metrics_key: list[str] = typer.Option([], "--metrics-key", envvar="COSINE_METRICS_KEY", help="require this key for /metrics (Authorization: Bearer ...); repeatable", callback=warn_secret_argument),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="allow browser requests from this origin; repeatable (* for any)"),
    grace_s: float = typer.Option(30.0, "--grace-s", help="on SIGTERM: how long open requests may take to finish"),
    timing_header: bool = typer.Option(False, "--timing-header", help="answer with X-Cosine-Timing: when the request arrived, was submitted, and its first output came (epoch ms; for measurements)"),
    redis_url: str | None = RedisUrlOption,
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /ready) as one more client of the pipeline's Redis."""
    import uvicorn

    from cosine.gateway import Gateway, GatewaySettings, default_model_name, read_api_keys

    config = configure(config_path, verbose)
    try:
        keys = read_api_keys(api_key_file, api_key)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--api-key-file") from None
    settings = GatewaySettings(tuple(served_model_name) or (default_model_name(config),), tuple(k for k in api_key if k), tuple(cors_origin),
                               api_keys_file=api_key_file,
                               answer_timeout_s=config.pipeline.deadline_s + 60, timing_header=timing_header,
                               metrics_keys=tuple(k for k in metrics_key if k))
    app_ = Gateway(config, client_url(config, redis_url, admin=True), settings).app()
    typer.echo(f"cosine gateway on http://{host}:{port} (models: {', '.join(settings.served_model_names)}; "
               f"API keys: {'required' if keys else 'none'})", err=True)
    # Objects made at start-up never die: keep them out of the collector's full passes, which
    # stall every open stream at once (a pause grows with the heap).
    import gc

    gc.collect()
    gc.freeze()
    uvicorn.run(app_, host=host, port=port, timeout_graceful_shutdown=grace_s, log_level="info" if verbose else "warning",
                access_log=verbose, loop="uvloop" if sys.platform != "win32" else "auto")


@app.command()
def status(
    redis_url: str | None = typer.Option(None, "--redis-url", callback=warn_secret_argument),
    as_json: bool = typer.Option(False, "--json"),
    watch: bool = typer.Option(False, "--watch", "-w", help="a live view, refreshed every --interval seconds, until Ctrl-C"),
    interval: float = typer.Option(1.0, "--interval", min=0.1),
    config_path: Path | None = ConfigOption,
) -> None:
    """Queue depths, pending entries, live workers, counters and worker restarts (--watch: live,
    with tokens/s, acceptance per drafter and expert, and the verifiers' busy share)."""
    from cosine.status import read_snapshot, read_status, view

    config = configure(config_path)
    url = client_url(config, redis_url, admin=True)
    if watch:
        import time

        from rich.live import Live

        before = read_snapshot(url, config.redis.namespace)
        with Live(view(before), refresh_per_second=4, screen=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    now = read_snapshot(url, config.redis.namespace)
                    live.update(view(now, before))
                    before = now
            except KeyboardInterrupt:
                return
    report = read_status(url, config.redis.namespace)
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
    typer.echo("restarts: " + (", ".join(f"{k}={v}" for k, v in report["restarts"].items()) or "none"))
    typer.echo("tenants:")
    for name, row in report["tenants"].items():
        ended = ", ".join(f"{k} {v}" for k, v in sorted(row["requests"].items())) or "none"
        typer.echo(f"  {name:20s} admitted {row['admitted']}, waiting {row['waiting']}; ended: {ended}; refused busy {row['refused_busy']}; "
                   f"tokens: prompt {row['prompt_tokens']}, generated {row['generated_tokens']}")


@app.command()
def demo(
    max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
    config_path: Path | None = ConfigOption,
) -> None:
    """The whole pipeline (embedded Redis, every stage) on a few chat prompts vs the target alone."""
    from cosine.demo import run_demo

    config = configure(config_path)
    run_demo(config, config_path, max_tokens, typer.echo)
