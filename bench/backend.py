"""The fast backend every scenario proxies to: small bodies, answered at once.

Run as `python -m bench.backend --port P`. `/login?user=N` answers with the gateway's
`X-Session-Login` instruction so sessions are created through the real login path.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web

BODY = b"<html><body><h1>Fake Web Retailer</h1><p>fast backend page</p></body></html>\n"


# The proof of work (bench/proof.py): a request carrying `X-Bench-Proof` gets back the
# user id the proxy put in `X-Session-User-Id` (and whether it called the session
# authenticated) under a name no proxy strips. Only then, so the measured requests cost
# the backend exactly what they did before.
PROOF = "X-Bench-Proof"
SEEN_USER = "X-Bench-Seen-User-Id"
SEEN_AUTH = "X-Bench-Seen-Authenticated"


async def page(request: web.Request) -> web.Response:
    if PROOF in request.headers:
        seen = {
            SEEN_USER: request.headers.get("X-Session-User-Id", ""),
            SEEN_AUTH: request.headers.get("X-Session-Authenticated", ""),
        }
        return web.Response(body=BODY, content_type="text/html", headers=seen)
    return web.Response(body=BODY, content_type="text/html")


async def login(request: web.Request) -> web.Response:
    uid = request.query.get("user", "1")
    if not uid.isdigit():
        return web.Response(status=400, text="user must be a number\n")
    instr = f"user_id={uid}; username=u{uid}; email=u{uid}%40example.com"
    return web.Response(text="logged in\n", headers={"X-Session-Login": instr})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/login", login)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


async def serve_forever(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` until killed (every bench server runs so)."""
    # access_log=None: logging every request would cost more than answering it.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    uvloop.run(serve_forever(make_app(), ap.parse_args().port))


if __name__ == "__main__":
    main()
