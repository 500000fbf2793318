"""Scenario b: nginx `proxy_pass` with upstream keepalive, one worker process."""

from __future__ import annotations

from pathlib import Path

from bench.procs import Child, Children, Pinning, wait_port


def nginx_conf(tmp: Path, port: int, backend_port: int) -> str:
    # worker_processes 1 so nginx gets the same single event loop as the Python
    # proxies; every path points into the temp dir so nothing touches /var or /etc.
    return f"""
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{
        server 127.0.0.1:{backend_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering on;
        }}
    }}
}}
"""


def start_nginx(
    children: Children, tmp: Path, pin: Pinning, port: int, backend_port: int
) -> Child:
    ndir = tmp / "nginx"
    ndir.mkdir(exist_ok=True)
    conf = ndir / "nginx.conf"
    conf.write_text(nginx_conf(ndir, port, backend_port))
    # -e (1.19.5+) keeps the startup error log out of /var/log/nginx as well.
    cmd = ["nginx", "-c", str(conf), "-p", str(ndir), "-e", str(ndir / "nginx-error.log")]
    child = children.start("nginx", pin.wrap(cmd, pin.server_cpus), tmp)
    wait_port(child, port)
    return child
