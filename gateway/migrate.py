"""``python -m gateway migrate status --config FILE``: the cut-over report of a migration
from sessions kept elsewhere (the legacy app's table) to the gateway's.

The core names no plugin: every configured plugin is built as the gateway builds it and
asked for its ``migration_status`` rows (plugins/legacy_sessions.py answers with sessions
imported, legacy sessions still live, database reads and writes per minute over the last
hour, and the share of requests by session source). It runs beside a live gateway: it
reads Redis and the database, and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .chain import build_chain
from .config import ConfigError, Settings, load_settings
from .plugin import Services
from .redis import Keys, RedisLayer
from .redis.embedded import socket_path


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m gateway migrate", description=__doc__)
    sub = ap.add_subparsers(dest="action", required=True)
    status = sub.add_parser("status", help="print the cut-over report and exit")
    status.add_argument("--config", default="config.yaml", help="the gateway's config.yaml")
    return ap.parse_args(argv)


def redis_url(settings: Settings) -> str:
    """The server the gateway uses; for ``embedded``, its socket in ``redis.data_dir``
    (reachable by the same user while the gateway runs)."""
    if settings.redis.topology != "url" or settings.redis.url != "embedded":
        return settings.redis.url  # unused under redis.sentinel or redis.cluster
    sock = socket_path(Path(settings.redis.data_dir))
    if sock is None:
        raise ConfigError(
            "redis.data_dir: the path is too long for a Unix socket, so the embedded Redis "
            "listens on a private port this command cannot know; use a shorter data_dir"
        )
    return "unix://" + str(sock)


async def status(settings: Settings) -> list[tuple[str, list[tuple[str, str]]]]:
    """(plugin name, rows) for every configured plugin that reports."""
    keys = Keys(settings.session.key_prefix, raw_tokens=settings.session.raw_token_keys)
    redis = RedisLayer(settings.redis, redis_url(settings), keys)
    services = Services(settings, redis.client, keys, redis.timeout, redis.script)
    try:
        reports = []
        for plugin in build_chain(settings, services).plugins:
            rows = await plugin.migration_status()
            if rows is not None:
                reports.append((plugin.name, rows))
        return reports
    finally:
        await redis.close()


def main(argv: list[str]) -> int:
    args = _args(argv)
    try:
        settings = load_settings(args.config)
        reports = asyncio.run(status(settings))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not reports:
        print(f"{args.config}: no configured plugin reports a migration (legacy_sessions?)")
        return 1
    for name, rows in reports:
        print(f"{name}:")
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")
    return 0
