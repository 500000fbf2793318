"""Copy a single Redis's gateway keys into a Redis Cluster, under their hash-tagged names.

``python -m gateway.redis.migrate --config cluster.yaml --source redis://old:6379/0``

Under ``redis.cluster`` every key about a session carries the session's tag and every
key about a user the user's (keys.py): ``session:<id>`` becomes ``session:{<id>}``,
``cart:<id>`` ``cart:{<id>}``, ``user_sessions:<uid>`` ``user_sessions:{u:<uid>}``. A
cluster gateway does not read the old names, so live sessions must be copied across
before the gateways switch. Each key is copied whole (DUMP / RESTORE, its TTL kept,
replacing a key of the same name), so the command can be run again.

What is copied: the session hashes and the keys plugins keep per session (``--session-
kinds``: cart, viewed) and per user (``--user-kinds``: user_sessions,
user_sessions_ending, user_cart), renamed; every other key under the prefix as it is
(``viewed:ranking``), except what is transient (``gw:``, ``pagecache:``, ``ratelimit:``).
The procedure that loses no acknowledged login or logout is in the README (Operations,
"Moving to a cluster"): writes on the old Redis stopped first, then this copy, then the
gateways switched.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterator

import redis
from redis.cluster import ClusterNode, RedisCluster

from ..config import ConfigError, Settings, load_settings, split_host_port
from ..sessions.model import TOKEN_RE
from .client import tls_options
from .keys import Keys, glob_escape

SESSION_KINDS = ("session", "cart", "viewed")
USER_KINDS = ("user_sessions", "user_sessions_ending", "user_cart")
TRANSIENT = ("gw:", "pagecache:", "ratelimit:")
_KEY_ID = re.compile(r"[0-9a-f]{64}")
BATCH = 500


class Renamer:
    """Old (single-node) key name → its name under hash tags, or None to skip it."""

    def __init__(
        self,
        settings: Settings,
        session_kinds: tuple[str, ...] = SESSION_KINDS,
        user_kinds: tuple[str, ...] = USER_KINDS,
    ) -> None:
        s = settings.session
        self.prefix = s.key_prefix
        self.raw_tokens = s.raw_token_keys
        self.tagged = Keys(s.key_prefix, raw_tokens=s.raw_token_keys, hash_tags=True)
        # Longest first: user_sessions_ending before user_sessions.
        self.session_kinds = sorted(session_kinds, key=len, reverse=True)
        self.user_kinds = sorted(user_kinds, key=len, reverse=True)

    def _is_key_id(self, v: str) -> bool:
        return bool((TOKEN_RE if self.raw_tokens else _KEY_ID).fullmatch(v))

    def rename(self, key: str) -> tuple[str, str] | None:
        """(the family it was counted under, the new name), or None (not copied)."""
        if not key.startswith(self.prefix):
            return None
        rest = key[len(self.prefix) :]
        if rest.startswith(TRANSIENT):
            return None
        for kind in self.user_kinds:
            if rest.startswith(f"{kind}:"):
                uid = rest[len(kind) + 1 :]
                if kind == "user_sessions":
                    return kind, self.tagged.user_sessions(uid)
                if kind == "user_sessions_ending":
                    return kind, self.tagged.user_sessions_ending(uid)
                return kind, self.tagged.of_user(kind, uid)
        for kind in self.session_kinds:
            if rest.startswith(f"{kind}:"):
                key_id = rest[len(kind) + 1 :]
                if self._is_key_id(key_id):
                    if kind == "session":
                        return kind, self.tagged.session(key_id)
                    return kind, self.tagged.of(kind, key_id)
        if "{" in rest:
            return None  # already tagged: a cluster's own key, not this copy's business
        return "other", key


def _scan(source: redis.Redis, prefix: str) -> Iterator[list[str]]:
    batch: list[str] = []
    for k in source.scan_iter(match=f"{glob_escape(prefix)}*", count=1000):
        batch.append(k.decode() if isinstance(k, bytes) else str(k))
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch




def copy(
    source: redis.Redis, target: RedisCluster, renamer: Renamer, dry_run: bool = False
) -> Counter[str]:
    """Copy every key ``renamer`` maps; the counts by family (and ``skipped``)."""
    counts: Counter[str] = Counter()
    for keys in _scan(source, renamer.prefix):
        moves = []
        for k in keys:
            r = renamer.rename(k)
            if r is None:
                counts["skipped"] += 1
            else:
                moves.append((k, *r))
        if not moves or dry_run:
            for _, family, _ in moves:
                counts[family] += 1
            continue
        pipe = source.pipeline(transaction=False)
        for old, _, _ in moves:
            pipe.dump(old)
            pipe.pttl(old)
        dumped = pipe.execute()
        tpipe = target.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        restored = []
        for i, (_, family, new) in enumerate(moves):
            data, ttl = dumped[2 * i], dumped[2 * i + 1]
            if data is None or ttl == -2:
                counts["gone"] += 1  # expired or deleted since the scan
                continue
            tpipe.restore(new, max(int(ttl), 0), data, replace=True)
            restored.append(family)
        tpipe.execute()
        counts.update(restored)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.redis.migrate", description=__doc__)
    ap.add_argument("--config", required=True, help="the cluster gateway's config.yaml")
    ap.add_argument("--source", required=True, help="the old Redis: redis://host:port/db")
    ap.add_argument("--session-kinds", default=",".join(SESSION_KINDS[1:]))
    ap.add_argument("--user-kinds", default=",".join(USER_KINDS[2:]))
    ap.add_argument("--dry-run", action="store_true", help="count, copy nothing")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cluster = settings.redis.cluster
    if cluster is None:
        print("config error: redis.cluster: the target must be a cluster", file=sys.stderr)
        return 2
    renamer = Renamer(
        settings,
        ("session", *[k for k in args.session_kinds.split(",") if k]),
        ("user_sessions", "user_sessions_ending", *[k for k in args.user_kinds.split(",") if k]),
    )
    source = redis.Redis.from_url(args.source, socket_timeout=10)
    nodes = [
        ClusterNode(*split_host_port(n))  # type: ignore[no-untyped-call]
        for n in cluster.nodes
    ]
    tls = tls_options(settings.redis.tls)
    target = RedisCluster(
        startup_nodes=nodes,
        password=cluster.password.get_secret_value() if cluster.password else None,
        username=cluster.username,
        socket_timeout=10,
        **({"ssl": True, **tls} if tls else {}),
    )
    try:
        counts = copy(source, target, renamer, args.dry_run)
    except redis.RedisError as e:
        print(f"migrate failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        source.close()
        target.close()
    verb = "would copy" if args.dry_run else "copied"
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{verb}: {summary or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
