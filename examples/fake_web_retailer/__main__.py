"""``python -m examples.fake_web_retailer --port 9000 [--mode gateway|legacy] [--db …]``."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from aiohttp import web
from aiohttp.log import access_logger

from .app import MODES, make_app

DEFAULT_DB = "sqlite:var/fake_web_retailer.sqlite3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.fake_web_retailer",
        description="The Fake Web Retailer demo shop.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--mode", choices=MODES, default="gateway",
                        help="gateway: sessions come from the Session Gateway's headers; "
                             "legacy: the shop keeps its own sessions table; migrating: "
                             "both, per request (behind a gateway rolling out)")
    db = parser.add_mutually_exclusive_group()
    db.add_argument("--db", default=DEFAULT_DB, help="sqlite:PATH (default: %(default)s)")
    db.add_argument("--dsn", help="postgresql://user:pass@host:port/dbname")
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args(argv)
    if args.dsn and not args.dsn.startswith(("postgresql://", "postgres://")):
        parser.error("--dsn must be a postgresql:// URL")
    if not args.dsn and not args.db.startswith("sqlite:"):
        parser.error("--db must be sqlite:PATH (use --dsn for PostgreSQL)")
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode in ("gateway", "migrating") and not _is_loopback(args.host):
        print(
            "warning: gateway mode trusts X-Session-* request headers; make sure only the "
            "Session Gateway can reach this address",
            file=sys.stderr,
        )
    app = make_app(args.mode, args.dsn or args.db)
    print(f"Fake Web Retailer ({args.mode} mode) on http://{args.host}:{args.port}/",
          flush=True)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        access_log=None if args.no_access_log else access_logger,
    )


if __name__ == "__main__":
    main()
