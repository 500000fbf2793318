"""Scenarios n, o and o2: the OpenResty peer (nginx + Lua + lua-resty-redis).

Built from Debian's `nginx-light`, `libnginx-mod-http-lua` and `lua-resty-core` plus the
Lua files in `bench/peer/lualib/` (see bench/peer/README.md). The config is the peer's
published one (`../shared/peer/README.md`, mode `sync`): per request, HGETALL of
`session:<sha256 hex>` and a pipelined HSET/HINCRBY/EXPIRE through a pooled cosocket.

- n: the same nginx with the Lua modules loaded and the same proxy headers, but no Lua
  phase handler: what nginx itself costs (the issue's first row);
- o: the peer, `worker_processes 1` (paired with the one-process gateway, e);
- o2: the peer, `worker_processes 2` (paired with the gateway's `workers: 2`, f).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.procs import ROOT, Child, Children, Pinning, log, wait_port

LUALIB = ROOT / "bench" / "peer" / "lualib"
MODULES = Path("/usr/lib/nginx/modules")
# What the three packages provide that the config below needs.
REQUIRED = {
    "nginx-light": Path("/usr/sbin/nginx"),
    "libnginx-mod-http-lua": MODULES / "ngx_http_lua_module.so",
    "lua-resty-core": Path("/usr/share/lua/5.1/resty/core.lua"),
}
PACKAGES = tuple(REQUIRED)


def missing_packages() -> list[str]:
    return [pkg for pkg, path in REQUIRED.items() if not path.exists()]


def ensure_openresty() -> str | None:
    """Install the peer's Debian packages when one is missing (as procs.ensure_system_package
    does for wrk). None when they are there, else why they could not be installed.

    Debian's nginx package tries to start the system nginx on port 80 when installed;
    `policy-rc.d` (present in containers) forbids that, and where it is absent the
    service is the machine's business: the harness never uses /etc/nginx or port 80.
    """
    if not missing_packages():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"{', '.join(missing_packages())} not installed and apt-get (as root) is "
                "not available")  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd, limit in (
        (["apt-get", "update", "-qq"], 300),
        (["apt-get", "install", "-y", "-qq", *PACKAGES], 400),
    ):
        log(f"OpenResty peer: running {' '.join(cmd)}")
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out after {limit} s"
        if res.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-300:]}"
    still = missing_packages()
    if still:
        return f"apt-get install did not provide {', '.join(still)}"
    log(f"installed {' '.join(PACKAGES)}")
    return None


def openresty_conf(
    ndir: Path, port: int, backend_port: int, redis_port: int | None, workers: int
) -> str:
    """The peer README's server block; `redis_port` None = scenario n (no Lua phase).

    Every path points into the temp dir (pid, logs, temp files) so nothing touches /var
    or /etc/nginx; `user root` because those dirs are the harness's own (mode 0700).
    """
    if redis_port is None:
        init = ""
        lua_phases = ""
    else:
        init = (
            'init_by_lua_block { require("peer_session").configure({ host = "127.0.0.1", '
            f'port = {redis_port}, mode = "sync", idle_ttl = 3600, absolute_ttl = 28800, '
            "timeout_ms = 500, pool_size = 256 }) }"
        )
        lua_phases = """
            access_by_lua_block { require("peer_session").access() }
            header_filter_by_lua_block { require("peer_session").header_filter() }"""
    return f"""
load_module {MODULES}/ndk_http_module.so;
load_module {MODULES}/ngx_http_lua_module.so;
worker_processes {workers};
daemon off;
user root;
pid {ndir}/nginx.pid;
error_log {ndir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {ndir}/client_body;
    proxy_temp_path {ndir}/proxy;
    fastcgi_temp_path {ndir}/fastcgi;
    uwsgi_temp_path {ndir}/uwsgi;
    scgi_temp_path {ndir}/scgi;
    lua_package_path "{LUALIB}/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_shared_dict peer_stats 1m;
    lua_max_pending_timers 16384;
    lua_max_running_timers 1024;
    {init}
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{{lua_phases}
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header Forwarded "";
            proxy_set_header X-Real-IP "";
            proxy_set_header X-Original-URL "";
            add_header X-Request-Id $request_id always;
        }}
    }}
}}
"""


def start_openresty(
    children: Children,
    tmp: Path,
    pin: Pinning,
    name: str,
    port: int,
    backend_port: int,
    redis_port: int | None,
    workers: int = 1,
) -> Child:
    """nginx with the peer's config on the server CPUs (workers inherit the affinity)."""
    ndir = tmp / name
    ndir.mkdir(exist_ok=True)
    conf = ndir / "nginx.conf"
    conf.write_text(openresty_conf(ndir, port, backend_port, redis_port, workers))
    # -e keeps the start-up error log out of /var/log/nginx as well.
    cmd = ["nginx", "-c", str(conf), "-p", str(ndir), "-e", str(ndir / "error.log")]
    child = children.start(name, pin.wrap(cmd, pin.server_cpus), tmp)
    wait_port(child, port)
    return child
