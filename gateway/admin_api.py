"""The admin API on the admin listener, under ``/admin/``: list a user's sessions, show
one session, revoke one, revoke all of a user's.

    GET    /admin/users/{user_id}/sessions   the user's sessions (``?limit=``, 1-1000)
    DELETE /admin/users/{user_id}/sessions   end them all (logout everywhere)
    GET    /admin/sessions/{id}              one session's fields
    DELETE /admin/sessions/{id}              end it

``{id}`` is a session's public id (``X-Session-Id``: SHA-256 of the cookie token); the
API never sees, takes or returns a token. With ``session.raw_token_keys`` a session's
keys are named by its token, so a session is found through its user's index:
``?user_id=`` is then required for the ``/admin/sessions/{id}`` calls.

Revocations run the same session actions as the proxy (sessions/actions.py), so the
plugins' lifecycle hooks run (the cart of a revoked session goes with it, and so on).
Answers are JSON, errors too (``{"error": ...}``); a DELETE may carry a JSON body
``{"reason": "..."}``, which goes into the log line.

Off unless ``admin.token`` is set (the paths are then unknown: 404). Every call needs
``Authorization: Bearer <token>``, compared in constant time; every call is logged with
the caller's address (refused ones at most a few per minute, with a count of the rest).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import web

from . import metrics
from .errors import RedisUnavailable, bounded
from .logs import Throttle
from .redis import public_id
from .runtime import Runtime

log = logging.getLogger("gateway.admin")

_TOKEN_DIGEST = web.AppKey("admin_api_token_digest", bytes)
# Refused calls are logged a few at a time: a scanner must not fill the log.
_REFUSALS = web.AppKey("admin_api_refusals", Throttle)
_SUMMARY = web.RequestKey("admin_api_summary", str)

SESSION_ID_RE = re.compile(r"[0-9a-f]{64}")
MAX_USER_ID = 256  # characters
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
MAX_BODY = 4096  # bytes of a request body
MAX_REASON = 200  # characters of a reason kept for the log
# What a listing shows of each session (never a token: the hash holds none).
LISTED = ("user_id", "username", "login_time", "last_activity", "current_page", "page_views")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(token: str) -> bytes:
    # Both sides hashed to the same length first: compare_digest is constant-time only
    # for inputs of equal length, and the token's length must not leak either.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)




@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    route = request.match_info.route
    action = route.name or "unknown"
    caller = request.remote or "?"
    given = request.headers.get("Authorization", "")
    scheme, _, credential = given.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        _digest(credential.strip()), request.app[_TOKEN_DIGEST]
    )
    if not ok:
        metrics.ADMIN_CALLS.labels(action, "401").inc()
        throttle = request.app[_REFUSALS]
        if throttle.allow():
            more = throttle.take_suppressed()
            log.warning(
                "admin api: %s %r from %s refused: %s%s",
                request.method,
                request.raw_path[:200],
                caller,
                "wrong token" if given else "no bearer token",
                f" ({more} more refusals not logged)" if more else "",
            )
        return _error(401, "unauthorized", **{"WWW-Authenticate": 'Bearer realm="gateway-admin"'})
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        resp = _error(e.status, e.text or e.reason)
    except RedisUnavailable:
        resp = _error(503, "session store unavailable; try again")
    metrics.ADMIN_CALLS.labels(action, str(resp.status)).inc()
    log.info(
        "admin api: %s %r from %s: %d %s (%.1f ms)",
        request.method,
        request.raw_path[:200],
        caller,
        resp.status,
        request.get(_SUMMARY, ""),
        (time.perf_counter() - started) * 1000,
    )
    return resp


class _Api:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @property
    def timeout(self) -> float:
        return self.rt.redis.timeout

    # -- input ------------------------------------------------------------------------

    @staticmethod
    def _user_id(request: web.Request) -> str:
        uid = request.match_info["user_id"]
        if not uid or len(uid) > MAX_USER_ID:
            raise web.HTTPBadRequest(text=f"user id: 1 to {MAX_USER_ID} characters")
        return uid

    @staticmethod
    def _session_id(request: web.Request) -> str:
        sid = request.match_info["session_id"]
        if not SESSION_ID_RE.fullmatch(sid):
            raise web.HTTPBadRequest(text="session id: 64 lower-case hex digits (X-Session-Id)")
        return sid

    @staticmethod
    async def _reason(request: web.Request) -> str:
        """The optional ``{"reason": "..."}`` of a DELETE, for the log."""
        if not request.body_exists:
            return ""
        data = b""
        while len(data) <= MAX_BODY and (chunk := await request.content.read(MAX_BODY + 1)):
            data += chunk
        if len(data) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(data))
        if not data.strip():
            return ""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(text="body: not JSON") from None
        if not isinstance(doc, dict) or set(doc) - {"reason"}:
            raise web.HTTPBadRequest(text='body: {"reason": "..."} or nothing')
        reason = doc.get("reason", "")
        if not isinstance(reason, str):
            raise web.HTTPBadRequest(text="body.reason: must be a string")
        return f" reason={reason[:MAX_REASON]!r}"

    async def _key_id(self, request: web.Request, sid: str) -> str | None:
        """The key id of the session with public id ``sid``; None when it is not found."""
        keys = self.rt.redis.keys
        if not keys.raw_tokens:
            return sid
        uid = request.query.get("user_id")
        if not uid:
            raise web.HTTPBadRequest(
                text="with session.raw_token_keys a session is found through its user: "
                "add ?user_id="
            )
        client = self.rt.redis.client
        index = keys.user_sessions(uid)
        # The whole index, a page at a time: a user may hold up to session.max_per_user
        # (10,000) sessions, and a sample of them missed the one asked for.
        cursor = 0
        while True:
            cursor, members = cast(
                tuple[int, list[str]],
                await bounded("admin", client.sscan(index, cursor, count=MAX_LIMIT), self.timeout),
            )
            found = next((m for m in members if public_id(m) == sid), None)
            if found is not None or not cursor:
                return found

    # -- endpoints --------------------------------------------------------------------

    async def list_user(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        try:
            limit = int(request.query.get("limit", DEFAULT_LIMIT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            raise web.HTTPBadRequest(text=f"limit: a number from 1 to {MAX_LIMIT}")
        keys, client = self.rt.redis.keys, self.rt.redis.client
        index = keys.user_sessions(uid)

        async def read() -> tuple[int, list[str], list[Any]]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.scard(index)
                pipe.srandmember(index, limit)
                total, ids = await pipe.execute()
            async with client.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hmget(keys.session(key_id), LISTED)
                rows = await pipe.execute() if ids else []
            return int(total), list(ids), rows

        total, ids, rows = await bounded("admin", read(), self.timeout)
        sessions = []
        for key_id, values in zip(ids, rows, strict=True):
            fields = dict(zip(LISTED, values, strict=True))
            if fields["login_time"] is None and fields["last_activity"] is None:
                continue  # ended or expired; the next login's upkeep drops its id
            sessions.append(
                {
                    "id": public_id(key_id) if keys.raw_tokens else key_id,
                    "created": _number(fields["login_time"]),
                    "last_activity": _number(fields["last_activity"]),
                    "current_page": fields["current_page"],
                    "page_views": _number(fields["page_views"]),
                    "username": fields["username"],
                }
            )
        sessions.sort(key=lambda s: s["last_activity"] or 0, reverse=True)
        request[_SUMMARY] = f"{len(sessions)} sessions of user_id={uid!r}"
        return web.json_response(
            {
                "user_id": uid,
                "count": len(sessions),
                "indexed": total,
                "truncated": total > limit,
                "sessions": sessions,
            }
        )

    async def revoke_user(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        reason = await self._reason(request)
        n = await self.rt.sessions.actions.revoke_user(uid)
        request[_SUMMARY] = f"revoked {n} sessions of user_id={uid!r}{reason}"
        return web.json_response({"user_id": uid, "revoked": n})

    async def show(self, request: web.Request) -> web.Response:
        sid = self._session_id(request)
        key_id = await self._key_id(request, sid)
        fields: dict[str, str] = {}
        ttl = -2
        if key_id is not None:
            client, key = self.rt.redis.client, self.rt.redis.keys.session(key_id)

            async def read() -> list[Any]:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.hgetall(key)
                    pipe.pttl(key)
                    return list(await pipe.execute())

            fields, ttl = await bounded("admin", read(), self.timeout)
        request[_SUMMARY] = f"session={sid[:12]}"
        if not fields:
            raise web.HTTPNotFound(text="no such session")
        return web.json_response(
            {
                "id": sid,
                "user_id": fields.get("user_id"),
                "ttl": round(ttl / 1000, 3) if ttl >= 0 else None,
                "fields": fields,
            }
        )

    async def revoke(self, request: web.Request) -> web.Response:
        sid = self._session_id(request)
        reason = await self._reason(request)
        key_id = await self._key_id(request, sid)
        gone = key_id is not None and await self.rt.sessions.actions.revoke(key_id)
        request[_SUMMARY] = f"session={sid[:12]} {'revoked' if gone else 'not found'}{reason}"
        if not gone:
            raise web.HTTPNotFound(text="no such session")
        return web.json_response({"id": sid, "revoked": True})


def _number(value: str | None) -> float | int | None:
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if f.is_integer() and "." not in value else f


def build_api(runtime: Runtime, token: str) -> web.Application:
    """The API as an app to mount at ``/admin/``."""
    api = web.Application(middlewares=[_guard])
    api[_TOKEN_DIGEST] = _digest(token)
    api[_REFUSALS] = Throttle(burst=5, period=60.0)
    h = _Api(runtime)
    api.router.add_get("/users/{user_id}/sessions", h.list_user, name="list_user")
    api.router.add_delete("/users/{user_id}/sessions", h.revoke_user, name="revoke_user")
    api.router.add_get("/sessions/{session_id}", h.show, name="show_session")
    api.router.add_delete("/sessions/{session_id}", h.revoke, name="revoke_session")
    return api
