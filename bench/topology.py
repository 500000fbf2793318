"""Real Redis topologies on loopback ports, for the tests (tests/topologies.py) and
``make failover-demo`` (bench/failover_demo.py): a master with two replicas watched by
three Sentinels, and a Redis Cluster of three masters with one replica each.

Every process is a real ``redis-server`` (``--sentinel`` for the Sentinels) in its own
directory, on a free loopback port (never 6379), killed with the topology. Failures are
real too: SIGKILL, SIGSTOP, ``SENTINEL FAILOVER``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = int(s.getsockname()[1])
    assert port != 6379, "never the machine's shared Redis"
    return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    while True:
        port = random.randint(20000, 55535)
        if port == 6379:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((HOST, port))
                b.bind((HOST, port + 10000))
        except OSError:
            continue
        return port


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    """``check()``'s first truthy value within ``timeout`` seconds; errors count as no."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (redis.RedisError, OSError, RuntimeError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s" + (f" ({last})" if last else ""))
        time.sleep(every)


class Node:
    """One redis-server process on a fixed loopback port; it can be killed, stopped,
    resumed and started again on the same port."""

    def __init__(self, directory: Path, port: int, args: list[str], conf: Path | None = None):
        self.dir = directory
        self.port = port
        self.args = args
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, extra: list[str] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [REDIS_SERVER]
        if self.conf is not None:
            cmd += [str(self.conf), "--sentinel"]
        cmd += self.args + (extra or [])
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.stopped = False
        wait_until(f"redis on {self.port}", self.ping, 10)

    def ping(self) -> bool:
        with redis.Redis(host=HOST, port=self.port, socket_timeout=0.5) as c:
            return bool(c.ping())

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=self.port, decode_responses=True, socket_timeout=timeout
        )

    def kill(self) -> None:
        """SIGKILL: the process is gone at once (no shutdown, no goodbye to replicas)."""
        if self.proc is not None:
            if self.stopped:
                self.cont()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        if self.proc is not None and self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as c:
            return dict(c.info(section))


def _data_args(directory: Path, port: int) -> list[str]:
    return [
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--protected-mode", "no",
        "--logfile", str(directory / "redis.log"),
        # Full syncs without a disk round trip, at once: replicas catch up in
        # milliseconds after a failover.
        "--repl-diskless-sync", "yes",
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


class FailoverBotched(RuntimeError):
    """SENTINEL FAILOVER ended with the Sentinels naming a node that is a replica."""


class SentinelTopology:
    """A master, two replicas and three Sentinels (quorum 2), all on loopback."""

    def __init__(
        self,
        base: Path,
        master_name: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.base = base
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data: dict[int, Node] = {}
        self.sentinels: list[Node] = []

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> SentinelTopology:
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            d = self.base / f"data-{port}"
            d.mkdir(parents=True, exist_ok=True)
            node = Node(d, port, _data_args(d, port))
            self.data[port] = node
            node.start([] if i == 0 else ["--replicaof", HOST, str(ports[0])])
        for _ in range(3):
            port = free_port()
            d = self.base / f"sentinel-{port}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        f"bind {HOST}",
                        f"dir {d}",
                        f"logfile {d / 'sentinel.log'}",
                        f"sentinel monitor {self.master_name} {HOST} {ports[0]} 2",
                        f"sentinel down-after-milliseconds {self.master_name} "
                        f"{self.down_after_ms}",
                        f"sentinel failover-timeout {self.master_name} "
                        f"{self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {self.master_name} 2",
                        "",
                    ]
                )
            )
            node = Node(d, port, [], conf=conf)
            node.start()
            self.sentinels.append(node)
        self.wait_healthy(30)
        return self

    def close(self) -> None:
        for node in [*self.sentinels, *self.data.values()]:
            node.kill()

    @property
    def sentinel_addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def config(self, **extra: Any) -> dict[str, Any]:
        """The gateway's ``redis.sentinel`` section for this topology."""
        return {"master": self.master_name, "nodes": self.sentinel_addresses, **extra}

    # -- what the Sentinels say -------------------------------------------------------

    def master_port(self) -> int:
        """The master's port as the (reachable) Sentinels agree on it."""
        seen: set[int] = set()
        for s in self.sentinels:
            if not s.alive or s.stopped:
                continue
            with s.client(0.5) as c:
                _, port = c.sentinel_get_master_addr_by_name(self.master_name)
            seen.add(int(port))
        if len(seen) != 1:
            raise RuntimeError(f"sentinels disagree on the master: {sorted(seen)}")
        return seen.pop()

    @property
    def master(self) -> Node:
        return self.data[self.master_port()]

    def replicas(self) -> list[Node]:
        m = self.master_port()
        return [n for p, n in self.data.items() if p != m]

    def healthy(self) -> bool:
        """Every process up; every Sentinel names the same master, sees it up and knows
        the two other Sentinels; that master has both replicas online and caught up."""
        if not all(n.alive and not n.stopped for n in [*self.data.values(), *self.sentinels]):
            return False
        port = self.master_port()
        info = self.data[port].info("replication")
        if info.get("role") != "master" or info.get("connected_slaves") != 2:
            return False
        offset = info["master_repl_offset"]
        for i in range(2):
            replica = info[f"slave{i}"]
            if replica["state"] != "online" or replica["offset"] < offset - 1024:
                return False
        for s in self.sentinels:
            with s.client(0.5) as c:
                m = c.sentinel_master(self.master_name)
                if m["port"] != port or m["flags"] != "master" or m["num-other-sentinels"] < 2:
                    return False
        return True

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until("sentinel topology healthy", self.healthy, timeout, every=0.1)

    # -- failures ---------------------------------------------------------------------

    def failover(self, timeout: float = 40) -> tuple[int, int]:
        """``SENTINEL FAILOVER``: (old master port, new master port) once the Sentinels
        name the new one. Retried while a Sentinel answers INPROG or NOGOODSLAVE (it has
        not yet seen the replicas since the last failover), and sent again when the
        Sentinel gave its failover up: on a busy machine the chosen replica can miss the
        failover-timeout, and the Sentinel then waits twice that before it may try again
        on its own (a CI run saw no new master within 20 s).

        It returns after one clean failover: the old master is read once a Sentinel has
        taken the command (a failover still in progress when this was called may have
        moved the master meanwhile; read before, it named a master already gone, and the
        command then failed over the new one too, so the port returned as the new master
        was being demoted: a CI run saw it answer ROLE slave for seconds), nothing is
        sent again once the master has moved. A new master that does not answer ROLE
        master raises FailoverBotched."""
        deadline = time.monotonic() + timeout
        # An aborted attempt is over after failover-timeout; a retry is possible once the
        # Sentinel's 2 x failover-timeout guard has passed.
        attempt = 2 * self.failover_timeout_ms / 1000 + 1
        old: int | None = None
        while True:
            if old is not None:
                with contextlib.suppress(RuntimeError, redis.RedisError, OSError):
                    if (port := self.master_port()) != old:  # the last attempt landed
                        return old, port
            try:
                with self.sentinels[0].client() as c:
                    c.execute_command("SENTINEL", "FAILOVER", self.master_name)
            except redis.ResponseError as e:
                if time.monotonic() > deadline or not (
                    "INPROG" in str(e) or "NOGOODSLAVE" in str(e)
                ):
                    raise
                time.sleep(0.2)
                continue
            if old is None:
                # The switch comes seconds after the command is taken, never at once.
                old = self.master_port()
            try:
                new = self.wait_new_master(old, min(attempt, max(1.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                continue
            if self._is_master(new):
                return old, new
            # A botched failover: the Sentinels name a node that answers ROLE slave. Three
            # fresh-clone test runs here saw it; the topology then took over a minute to
            # heal. Not the failover the caller asked for, and nothing to wait out.
            raise FailoverBotched(
                f"the Sentinels name {new} as the new master, and it answers ROLE slave"
            )

    def _is_master(self, port: int, settle: float = 3.0) -> bool:
        """Whether ``port`` answers ROLE master within ``settle`` seconds."""
        end = time.monotonic() + settle
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                with self.data[port].client() as c:
                    if c.execute_command("ROLE")[0] == "master":
                        return True
            if time.monotonic() > end:
                return False
            time.sleep(0.1)

    def wait_new_master(self, old: int, timeout: float) -> int:
        def moved() -> int:
            port = self.master_port()
            return port if port != old else 0

        return int(wait_until("a new master", moved, timeout))

    def restart(self, port: int) -> None:
        """Start a killed data node again, as a replica of the current master (as an
        operator would; started as a master it would take writes until a Sentinel
        converted it)."""
        node = self.data[port]
        node.kill()
        node.start(["--replicaof", HOST, str(self.master_port())])


def _cluster_args(directory: Path, port: int, node_timeout_ms: int) -> list[str]:
    return [
        *_data_args(directory, port),
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(directory / "nodes.conf"),
        "--cluster-node-timeout", str(node_timeout_ms),
        # A master down takes its slots' sessions with it, not everyone's.
        "--cluster-require-full-coverage", "no",
    ]  # fmt: skip


class ClusterTopology:
    """Three masters with one replica each (``redis-cli --cluster create``)."""

    def __init__(self, base: Path, node_timeout_ms: int = 1000, replicas: int = 1) -> None:
        self.base = base
        self.node_timeout_ms = node_timeout_ms
        self.replicas_per_master = replicas
        self.nodes: dict[int, Node] = {}

    def start(self) -> ClusterTopology:
        for _ in range(3 * (1 + self.replicas_per_master)):
            port = free_cluster_port()
            d = self.base / f"cluster-{port}"
            node = Node(d, port, _cluster_args(d, port, self.node_timeout_ms))
            node.start()
            self.nodes[port] = node
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster", "create",
                *[n.address for n in self.nodes.values()],
                "--cluster-replicas", str(self.replicas_per_master),
                "--cluster-yes",
            ],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
        self.wait_healthy(30)
        return self

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes.values()]

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"nodes": self.addresses[:3], **extra}

    def client(self) -> redis.RedisCluster:
        """A cluster client (it follows slots and failovers) for checking data."""
        live = next(n for n in self.nodes.values() if n.alive and not n.stopped)
        return redis.RedisCluster(
            host=HOST, port=live.port, decode_responses=True, socket_timeout=2
        )

    def _shards(self) -> list[dict[str, Any]]:
        for n in self.nodes.values():
            if n.alive and not n.stopped:
                with n.client(0.5) as c:
                    return list(c.execute_command("CLUSTER", "SHARDS"))
        raise RuntimeError("no cluster node answers")

    def masters(self) -> list[Node]:
        """The nodes every reachable node agrees are masters of slots right now."""
        out = []
        for n in self.nodes.values():
            if not n.alive or n.stopped:
                continue
            with n.client(0.5) as c:
                if c.execute_command("ROLE")[0] == "master":
                    out.append(n)
        return out

    def master_of(self, key: str) -> Node:
        for n in self.masters():
            with n.client(0.5) as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, *owners in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return self.nodes[int(owners[0][1])]
        raise RuntimeError(f"no master for {key!r}")

    def healthy(self) -> bool:
        """Every node up and reporting cluster_state ok with all slots covered by three
        masters, each with its replicas in sync."""
        if not all(n.alive and not n.stopped for n in self.nodes.values()):
            return False
        masters = 0
        for n in self.nodes.values():
            with n.client(0.5) as c:
                info = c.execute_command("CLUSTER", "INFO")
                if isinstance(info, (bytes, str)):
                    text = info.decode() if isinstance(info, bytes) else info
                    info = dict(
                        line.split(":", 1) for line in text.splitlines() if ":" in line
                    )
                if str(info.get("cluster_state")) != "ok":
                    return False
                if int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
                if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                    return False
                repl = n.info("replication")
                if repl["role"] == "master":
                    masters += 1
                    if repl.get("connected_slaves") != self.replicas_per_master:
                        return False
                elif repl.get("master_link_status") != "up":
                    return False
        return masters == 3

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until("cluster healthy", self.healthy, timeout, every=0.1)

    def slot_owners(self) -> set[int]:
        return {int(s[2][1]) for s in self.slots()}

    def wait_promoted(self, dead: int, timeout: float = 20) -> Node:
        """The replica that took over the slots of the dead master ``dead``: once every
        slot has a live owner again."""
        others = self.slot_owners() - {dead}

        def new_owner() -> Node | None:
            owners = self.slot_owners()
            if dead in owners or len(owners) != 3:
                return None
            (port,) = owners - others
            return self.nodes[port]

        node: Node = wait_until("a replica promoted", new_owner, timeout, every=0.1)
        return node

    def slots(self) -> list[Any]:
        for n in self.nodes.values():
            if n.alive and not n.stopped:
                with n.client(0.5) as c:
                    return list(c.execute_command("CLUSTER", "SLOTS"))
        raise RuntimeError("no cluster node answers")

    def restart(self, port: int) -> None:
        """Start a killed node again: it rejoins (its nodes.conf) as a replica of the
        node that replaced it."""
        node = self.nodes[port]
        node.kill()
        node.start()


@contextlib.contextmanager
def sentinel_topology(base: Path, **kw: Any) -> Iterator[SentinelTopology]:
    topo = SentinelTopology(base, **kw)
    try:
        yield topo.start()
    finally:
        topo.close()


@contextlib.contextmanager
def cluster_topology(base: Path, **kw: Any) -> Iterator[ClusterTopology]:
    topo = ClusterTopology(base, **kw)
    try:
        yield topo.start()
    finally:
        topo.close()
