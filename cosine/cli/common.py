"""What the commands share: the Typer apps, common options, configuration and URL helpers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

import typer

from cosine.config import Config, load_config

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


def warn_secret_argument(ctx: typer.Context, param: typer.CallbackParam, value):
    """A password in --redis-url, or an --api-key, typed on the command line is visible to every
    user of the machine (the process list) and kept in shell history: say so, and what to use."""
    if value and ctx.get_parameter_source(param.name).name == "COMMANDLINE":
        secret = urlsplit(value).password is not None if param.name == "redis_url" else bool(value)
        if secret:
            typer.echo(f"warning: {param.opts[0]} on the command line shows its secret to other users of this machine "
                       f"(process list, shell history); use {SECRET_SOURCES[param.name]}", err=True)
    return value


RedisUrlOption = typer.Option(None, "--redis-url", help="default: $COSINE_REDIS_URL, redis.url, else the URL `cosine serve` wrote",
                              callback=warn_secret_argument)


def configure(config_path: Path | None, verbose: bool = False) -> Config:
    logging.basicConfig(
        level=(logging.DEBUG if os.environ.get("COSINE_DEBUG") else logging.INFO) if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return load_config(config_path)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None


def url_file(config: Config) -> Path:
    """Where `cosine serve` writes its clients' URL (the default tenant's user)."""
    return config.model.cache_path / "serve.url"


def admin_url_file(config: Config) -> Path:
    """Where `cosine serve` writes its administrator's URL (for `cosine status`, `dead`, `tenant`)."""
    return config.model.cache_path / "serve-admin.url"


def client_url(config: Config, redis_url: str | None, admin: bool = False) -> str:
    """--redis-url, else COSINE_REDIS_URL / redis.url, else the URL `cosine serve` wrote: its
    clients' (``admin``: its administrator's)."""
    url = redis_url or config.redis.url
    for path in ([admin_url_file(config)] if admin else []) + [url_file(config)]:
        if not url and path.is_file():
            url = path.read_text().strip()
    if not url:
        raise typer.BadParameter("no Redis URL: pass --redis-url, set COSINE_REDIS_URL, or start `cosine serve`")
    return url


AdminUrlOption = typer.Option(None, "--redis-url", help="an administrator's URL (default: $COSINE_REDIS_URL, redis.url, or the one `cosine serve` wrote)",
                              callback=warn_secret_argument)


def admin_client(redis_url: str | None, config):
    import redis

    url = client_url(config, redis_url, admin=True)
    return url, redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def write_private(path: Path, text: str) -> None:
    """The URL carries the server's password: only its owner may read the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
