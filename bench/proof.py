"""Proof of work: before a session scenario is measured, show that it does the work.

A proxy that skipped the session lookup (a misconfigured route, a Lua phase that never
ran, a near-cache answering for the wrong key) would post excellent numbers. So before
each session scenario one request is sent with a known cookie and `X-Bench-Proof: 1`;
the backend (bench/backend.py) echoes what it was given in `X-Session-User-Id` and
`X-Session-Authenticated`. The scenario passes when:

- the backend saw the user id stored in Redis for that cookie's session
  (`session:<sha256 hex of the token>`, the gateway's and the peer's layout alike) and
  `authenticated = true`;
- the session's `page_views` in Redis went up within a few seconds (the activity write
  happened; the gateway writes it behind, within its 100 ms flush window);
- a request without a cookie but with a forged `X-Session-User-Id` reached the backend
  without a user id (the proxy strips what a client sends).

A scenario whose proof fails is reported as failed and not measured.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.sessions import session_key

PROOF_HEADERS = {"X-Bench-Proof": "1"}
SEEN_USER = "X-Bench-Seen-User-Id"
SEEN_AUTH = "X-Bench-Seen-Authenticated"
FORGED_USER = "666666"


async def _get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, str | None, str | None]:
    async with http.get(url, headers={**PROOF_HEADERS, **headers}) as resp:
        await resp.read()
        return resp.status, resp.headers.get(SEEN_USER), resp.headers.get(SEEN_AUTH)


async def prove(url: str, path: str, cookie: str, redis_url: str) -> dict[str, Any]:
    """One proof request through `url` + `path` with `cookie` (`sid=<token>`)."""
    token = cookie.split("=", 1)[1]
    key = session_key(token)
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    out: dict[str, Any] = {"cookie_session": key}
    try:
        expected = await r.hget(key, "user_id")
        views_before = int(await r.hget(key, "page_views") or 0)
        out["expected_user_id"] = expected
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout
        ) as http:
            status, seen, auth = await _get(http, url + path, {"Cookie": cookie})
            out.update(status=status, seen_user_id=seen, seen_authenticated=auth)
            f_status, f_seen, _ = await _get(http, url + path,
                                             {"X-Session-User-Id": FORGED_USER})  # fmt: skip
            out.update(forged_status=f_status, forged_seen_user_id=f_seen)
        # The activity write: in the request (the peer) or behind it (the gateway).
        views = views_before
        deadline = time.monotonic() + 5
        while views <= views_before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            views = int(await r.hget(key, "page_views") or 0)
        out["page_views"] = [views_before, views]
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        out.update(passed=False, reason=f"proof request failed: {e!r}")
        return out
    finally:
        await r.aclose()
    problems = []
    if not expected:
        problems.append(f"no session in Redis for the proof cookie ({key})")
    if status != 200:
        problems.append(f"status {status}")
    if seen is None:
        problems.append("the backend did not answer the proof (no echo header)")
    elif seen != expected:
        problems.append(f"backend saw user id {seen!r}, Redis has {expected!r}")
    if auth != "true":
        problems.append(f"backend saw X-Session-Authenticated {auth!r}")
    if views <= views_before:
        problems.append(f"page_views stayed {views_before} (no activity write)")
    if f_status != 200 or f_seen:
        problems.append(f"forged X-Session-User-Id reached the backend as {f_seen!r} "
                        f"(status {f_status})")  # fmt: skip
    out["passed"] = not problems
    out["reason"] = "; ".join(problems) or (
        f"backend saw user {seen} for the cookie, page_views {views_before} → {views}, "
        "a forged header was stripped"
    )
    return out
