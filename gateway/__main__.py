"""``python -m gateway --config config.yaml [--check] [--log-format json]``;
``python -m gateway migrate status --config config.yaml`` (migrate.py);
``python -m gateway health --config config.yaml [--comprehensive] [--json]``
(health.py)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import ssl
import sys

from aiohttp import web

from . import logs
from .admin import build_admin_app
from .app import RUNTIME, build_app, server_kwargs
from .config import MAX_WORKERS, ConfigError, Settings, parse_workers, split_host_port
from .configcheck import load_checked
from .errors import REDIS_FAILURES
from .reload import ConfigSource, Reloader
from .server import GatewayRunner
from .tls import listeners

log = logging.getLogger("gateway")

ADMIN_KEEPALIVE = 5.0
# The first generation is collected after this many net allocations (CPython: 700).
GC_THRESHOLD = 20_000


def _workers_arg(value: str) -> int:
    try:
        n = parse_workers(value if value == "auto" else int(value))
    except ValueError:
        n = 0
    if not isinstance(n, int) or not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"a number from 1 to {MAX_WORKERS} or 'auto'")
    return n


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    ap.add_argument("--config", default="config.yaml", help="path to config.yaml")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    ap.add_argument("--log-format", choices=("text", "json"), default=None)
    ap.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None)
    ap.add_argument(
        "--workers",
        type=_workers_arg,
        default=None,
        help="worker processes sharing the port (SO_REUSEPORT), or 'auto' (one per CPU); "
        "overrides `workers:`",
    )
    # Set by the supervisor for its children; not for direct use.
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


async def serve(
    settings: Settings,
    worker: int | None = None,
    tls: ssl.SSLContext | None = None,
    source: ConfigSource | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. ``tls``: server_context(settings.listen_tls), built by
    main() so that a bad certificate is a config error, not a start-up failure.
    ``source``: the file to read again on SIGHUP (reload.py)."""
    app = build_app(settings)
    reloader: Reloader | None = None
    if source is not None:
        reloader = Reloader(app[RUNTIME], source)
        app[RUNTIME].on_stop.append(reloader.close)
    runner = GatewayRunner(
        app,
        settings,
        handle_signals=False,
        # In-flight requests get this long after SIGTERM before they are cut.
        shutdown_timeout=settings.shutdown_timeout,
        **server_kwargs(settings),
    )
    await runner.setup()
    try:
        await runner.app[RUNTIME].redis.client.ping()
    except REDIS_FAILURES as e:
        log.warning("redis not reachable at start (%s); routes follow on_redis_error", e)
    names = []
    for address, context in listeners(settings, tls):
        host, port = split_host_port(address)
        site = web.TCPSite(
            runner, host, port, backlog=1024, reuse_port=worker is not None, ssl_context=context
        )
        await site.start()
        names.append(f"{'https' if context else 'http'}://{address}")
    admin_runner: web.AppRunner | None = None
    # With several workers only the first serves the admin listener (every worker's
    # metrics: metrics_export.py).
    if settings.admin.listen and not worker:
        admin_runner = web.AppRunner(
            build_admin_app(app[RUNTIME]),
            handle_signals=False,
            access_log=None,
            # Scrapers reconnect; an idle admin connection need not live for aiohttp's hour.
            keepalive_timeout=ADMIN_KEEPALIVE,
        )
        await admin_runner.setup()
        ahost, aport = split_host_port(settings.admin.listen)
        await web.TCPSite(admin_runner, ahost, aport).start()
        log.info(
            "admin listening on %s (/healthz, /readyz, /metrics%s)",
            settings.admin.listen,
            ", /admin/" if settings.admin.token is not None else "",
        )
    # Every request allocates a few hundred short-lived objects, and with CPython's
    # default first-generation threshold (700) the cyclic collector ran every few
    # requests, each time also walking the thousands of long-lived objects built at
    # start-up: about 6 % of the gateway's CPU per request (python -m bench.cpu). Those
    # objects are moved out of the collector's sight, and it runs less often; garbage
    # without cycles is freed at once by reference counting either way.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 50)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
    who = f"worker {worker}, " if worker is not None else ""
    log.info("gateway listening on %s (%spid %d)", ", ".join(names), who, os.getpid())
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.0fs)", settings.shutdown_timeout)
    if admin_runner is not None:
        await admin_runner.cleanup()
    # Stops accepting, waits for in-flight handlers, then runs cleanup_ctx in reverse:
    # plugins, upstream client, activity flush, Redis.
    await runner.cleanup()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["migrate"]:
        from . import migrate

        return migrate.main(argv[1:])
    if argv[:1] == ["health"]:
        from .health import main as health

        return health(argv[1:])
    args = _args(argv)
    try:
        settings, tls = load_checked(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok")
        return 0
    logs.setup(args.log_format or settings.logging.format, args.log_level or settings.logging.level)
    worker_redis = os.environ.get("GATEWAY_WORKER_REDIS_URL")

    def for_this_process(s: Settings) -> Settings:
        if args.worker_index is not None and worker_redis:
            # The supervisor resolved redis.url (e.g. started the embedded server) once.
            return s.model_copy(update={"redis": s.redis.model_copy(update={"url": worker_redis})})
        return s

    source = ConfigSource(args.config, settings, for_this_process, args.log_level)
    settings = for_this_process(settings)
    workers = args.workers if args.workers is not None else settings.workers
    if workers > 1 and args.worker_index is None:
        from .workers import supervise

        return supervise(settings, workers, list(argv if argv is not None else sys.argv[1:]))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        runner = asyncio.run  # type: ignore[assignment]
    try:
        runner(serve(settings, args.worker_index, tls, source))
    except KeyboardInterrupt:
        pass
    except Exception as e:
        # Start-up failures (a port in use, embedded Redis missing) in one line.
        log.error("cannot start: %s: %s", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
