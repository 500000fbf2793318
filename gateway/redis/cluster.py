"""Redis Cluster: the client, and what the gateway needs to know about slots.

redis-py's ``RedisCluster`` routes each command to the master of its key's slot, follows
MOVED/ASK, and re-reads the topology when a node fails (a replica promoted after a
master died is found by itself). It refuses what a cluster cannot do: a multi-key
command, transaction or script whose keys are in different slots. The gateway's keys
carry hash tags under a cluster (keys.py), so everything about one session is in one
slot and everything about one user in another; the operations that need both are split
into per-slot steps (durable.py, sessions/store.py, plugins/cart.py).

The near-cache is off under a cluster (client.py says why in the log).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from ..config import ClusterSettings, RedisSettings, split_host_port

__all__ = ["RedisCluster", "cluster_client", "slot_of"]


def slot_of(key: str) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, or of the whole key)."""
    return int(key_slot(key.encode()))


def cluster_client(
    cluster: ClusterSettings, settings: RedisSettings, tls: dict[str, Any]
) -> RedisCluster:
    nodes = [ClusterNode(*split_host_port(n)) for n in cluster.nodes]
    kwargs: dict[str, Any] = {}
    if cluster.password is not None:
        kwargs["password"] = cluster.password.get_secret_value()
    if cluster.username is not None:
        kwargs["username"] = cluster.username
    if tls:
        kwargs.update(ssl=True, **tls)
    return RedisCluster(
        startup_nodes=nodes,
        decode_responses=True,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.connect_timeout,
        # Per node: a cluster client holds one pool per master.
        max_connections=settings.max_connections,
        # A master down takes its slots with it, not every session (the server-side
        # counterpart is cluster-require-full-coverage no).
        require_full_coverage=False,
        health_check_interval=30,
        **kwargs,
    )
