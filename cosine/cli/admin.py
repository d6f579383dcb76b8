"""Administration: ``cosine setup``, ``tenant``, ``dead``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cosine.config import redacted_url

from .common import (
    AdminUrlOption,
    ConfigOption,
    RedisUrlOption,
    admin_client,
    app,
    configure,
    dead_app,
    tenant_app,
    warn_secret_argument,
    write_private,
)


@app.command()
def setup(
    redis_url: str | None = typer.Option(None, "--redis-url", help="an administrator's URL (default: $COSINE_REDIS_URL or redis.url)", callback=warn_secret_argument),
    config_path: Path | None = ConfigOption,
) -> None:
    """Load this version's server-side function library, as an administrator: once per server
    and version (`cosine serve` does it on its embedded server). Workers only call it."""
    import redis

    from cosine.bus import LIBRARY, setup_library

    config = configure(config_path)
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

    config = configure(config_path)
    url, client = admin_client(redis_url, config)
    try:
        password = add_tenant(client, config.redis.namespace, name, TenantBounds(max_requests, max_unread, max_stream_mb))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    except redis.RedisError as error:
        typer.echo(f"error: could not add tenant {name} on {redacted_url(url)}: {error}", err=True)
        raise typer.Exit(1) from None
    tenant_url = user_url(url, user_name(name), password)
    if credentials_file is not None:
        write_private(credentials_file, tenant_url + "\n")
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

    config = configure(config_path)
    url, client = admin_client(redis_url, config)
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

    config = configure(config_path)
    _, client = admin_client(redis_url, config)
    rows = tenant_rows(client, config)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'tenant':<20} {'max_requests':>12} {'max_unread':>10} {'max_stream_mb':>13} {'admitted':>8} {'waiting':>7}")
    for row in rows:
        typer.echo(f"{row['tenant']:<20} {row['max_requests'] or '-':>12} {row['max_unread'] or '-':>10} {row['max_stream_mb'] or '-':>13} "
                   f"{row['admitted']:>8} {row['waiting']:>7}")


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

    config = configure(config_path)
    with admin_client(redis_url, config)[1] as client:
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

    config = configure(config_path)
    with admin_client(redis_url, config)[1] as client:
        try:
            new_id = replay(client, Keys(config.redis.namespace), dead_id)
        except DeadLetterError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"replayed {dead_id} as {new_id}")
