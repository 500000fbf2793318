"""Fixtures with real Redis topologies on loopback ports (bench/topology.py starts
them): a master with two replicas watched by three Sentinels (down-after 1000 ms), and
a Cluster of three masters with a replica each. One topology per test module, handed to
each test healthy and empty; tests that break it (SIGKILL, SIGSTOP, failovers) leave it
to the next test's fixture to heal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.topology import ClusterTopology, SentinelTopology


@pytest.fixture(scope="module")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topo = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    try:
        yield topo.start()
    finally:
        topo.close()


@pytest.fixture
def sentinel(sentinel_topology: SentinelTopology) -> SentinelTopology:
    """The module's Sentinel topology: every node running, healthy, empty."""
    topo = sentinel_topology
    for node in [*topo.data.values(), *topo.sentinels]:
        node.cont()
    for port, node in topo.data.items():
        if not node.alive:
            topo.restart(port)
    topo.wait_healthy(40)
    with topo.master.client() as c:
        c.flushall()
        c.execute_command("WAIT", 2, 2000)
    return topo


@pytest.fixture(scope="module")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    topo = ClusterTopology(tmp_path_factory.mktemp("cluster"))
    try:
        yield topo.start()
    finally:
        topo.close()


@pytest.fixture
def cluster(cluster_topology: ClusterTopology) -> ClusterTopology:
    """The module's Cluster: every node running, every slot served, empty."""
    topo = cluster_topology
    for port, node in topo.nodes.items():
        node.cont()
        if not node.alive:
            topo.restart(port)
    topo.wait_healthy(40)
    for m in topo.masters():
        with m.client() as c:
            c.flushall()
    return topo


def topology_config(redis: dict[str, Any], upstream_url: str, **over: Any) -> dict[str, Any]:
    """A gateway config (tests' base routes) on ``redis`` (a ``redis:`` section)."""
    from .conftest import base_config

    cfg = base_config("redis://unused", upstream_url, **over)
    cfg["redis"] = {"timeout": 0.5, "connect_timeout": 0.5, **redis}
    return cfg


def elapsed(since: float) -> float:
    return time.monotonic() - since

