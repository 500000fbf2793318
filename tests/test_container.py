"""The container image and the compose topology agree with the docs and with each other."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DEPLOY_CONFIG = ROOT / "deploy" / "config.yaml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def last(instr: str) -> str:
    found = [args for word, args in dockerfile_instructions() if word == instr]
    assert found, f"Dockerfile has no {instr}"
    return found[-1]


def exec_form(instr: str) -> list[str]:
    args = last(instr)
    value = json.loads(args)  # exec form only: shell form would put sh -c in between
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def readme_run_lines() -> list[str]:
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing at the repo root"
    return [ln for ln in readme.read_text().splitlines() if "python -m gateway --config" in ln]


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def command_text(service: dict[str, Any]) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


# ------------------------------------------------------------------- Dockerfile
def test_entrypoint_and_cmd_form_the_documented_run_command() -> None:
    argv = exec_form("ENTRYPOINT") + exec_form("CMD")
    assert argv[:4] == ["python", "-m", "gateway", "--config"]
    assert len(argv) == 5, f"expected exactly `python -m gateway --config <path>`, got {argv}"
    config_path = argv[4]
    assert config_path.startswith("/") and config_path.endswith((".yaml", ".yml"))
    # The image really has a config at that path (baked; a mount may replace it).
    copies = [shlex.split(args) for word, args in dockerfile_instructions() if word == "COPY"]
    baked = [c for c in copies if c[-1] == config_path]
    assert baked, f"no COPY puts a config at {config_path}"
    for *sources, _ in baked:
        for src in sources:
            if not src.startswith("--"):
                assert (ROOT / src).is_file(), f"COPY source {src} does not exist"


def test_readme_shows_the_same_run_command() -> None:
    lines = readme_run_lines()
    assert lines, "README.md has no line with `python -m gateway --config`"
    # Where the README shows the container's command (an absolute config path), it must
    # be the image's.
    image_path = exec_form("CMD")[-1]
    pattern = re.compile(r"python -m gateway --config (/[^\s`'\")]+)")
    shown = {m for ln in lines for m in pattern.findall(ln)}
    assert shown <= {image_path}, f"README shows {shown}, the image uses {image_path}"


def test_image_basics() -> None:
    assert last("FROM") == "python:3.11-slim"
    user = last("USER")
    assert user not in ("root", "0", "0:0"), "the gateway must not run as root"
    install = " ".join(args for word, args in dockerfile_instructions() if word == "RUN")
    assert re.search(r"\bpip install \.", install), "the package is installed with pip"
    for word, args in dockerfile_instructions():
        if word == "COPY":
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"


def test_healthcheck_uses_python_urllib_against_the_admin_listener() -> None:
    check = last("HEALTHCHECK")
    assert "CMD" in check and "urllib.request" in check
    assert "curl" not in check and "wget" not in check
    env = " ".join(args for word, args in dockerfile_instructions() if word == "ENV")
    match = re.search(r"GATEWAY_HEALTHCHECK_URL=http://127\.0\.0\.1:(\d+)/healthz", env)
    assert match, "GATEWAY_HEALTHCHECK_URL is not set to a local /healthz"
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    assert config["admin"]["listen"].endswith(":" + match.group(1)), (
        "the healthcheck port must be the baked config's admin listener"
    )


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "var"):
        assert entry in ignored


# ---------------------------------------------------------------------- compose
def test_compose_has_the_case_study_topology() -> None:
    services: dict[str, Any] = compose()["services"]
    for name in ("gateway", "shop", "postgres", "redis-master"):
        assert name in services, f"service {name} missing"

    assert services["gateway"]["deploy"]["replicas"] == 2

    replicas = [
        n for n, s in services.items() if "--replicaof redis-master 6379" in command_text(s)
    ]
    assert len(replicas) == 2, replicas
    sentinels = [n for n, s in services.items() if "redis-sentinel" in command_text(s)]
    assert len(sentinels) == 3, sentinels
    for name in sentinels:
        text = command_text(services[name])
        assert "sentinel monitor mymaster redis-master 6379 2" in text
        assert services[name]["environment"]["SENTINEL_NAME"] == name
    for name in ("redis-master", *replicas, *sentinels):
        assert str(services[name]["image"]).startswith("redis:"), "official redis image"

    shop = command_text(services["shop"])
    assert "examples.fake_web_retailer" in " ".join(services["shop"]["entrypoint"])
    assert re.search(r"--dsn postgresql://\S+@postgres:5432/", shop)
    assert "--mode gateway" in shop
    assert "ports" not in services["shop"], "the shop trusts X-Session-*: never publish it"
    assert str(services["postgres"]["image"]).startswith("postgres:")

    build = services["gateway"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_deploy_config_points_at_the_compose_services() -> None:
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    services = compose()["services"]
    # The gateways find the master through the Sentinels, never by its address.
    sentinel = config["redis"]["sentinel"]
    assert "url" not in config["redis"]
    assert sorted(sentinel["nodes"]) == [f"sentinel-{i}:26379" for i in (1, 2, 3)]
    for node in sentinel["nodes"]:
        name = node.partition(":")[0]
        assert name in services and "port 26379" in command_text(services[name])
        monitor = re.search(r"sentinel monitor (\S+) ", command_text(services[name]))
        assert monitor and sentinel["master"].endswith(f"-{monitor.group(1)}}}"), monitor
    port = re.search(r"--port (\d+)", command_text(services["shop"]))
    assert port
    assert config["upstreams"]["shop"]["servers"] == [f"http://shop:{port.group(1)}"]
    assert config["listen"].endswith(":8080")
    assert any(p.endswith(":8080") for p in services["gateway"]["ports"])
    assert any((p if isinstance(p, str) else next(iter(p))) == "cart" for p in config["plugins"])


def test_deploy_config_is_a_valid_gateway_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config_mod = importlib.import_module("gateway.config")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("COOKIE_SECURE", raising=False)
    settings = config_mod.load_settings(str(DEPLOY_CONFIG))
    assert settings.redis.topology == "sentinel"
    assert settings.redis.sentinel.master == "mymaster"
    assert settings.redis.wait is not None
    assert settings.session.cookie.secure is True
    monkeypatch.setenv("COOKIE_SECURE", "false")
    assert config_mod.load_settings(str(DEPLOY_CONFIG)).session.cookie.secure is False


# ------------------------------------------------------------- the cluster variant
COMPOSE_CLUSTER = ROOT / "deploy" / "compose.cluster.yaml"
CLUSTER_CONFIG = ROOT / "deploy" / "config.cluster.yaml"


def test_cluster_variant_points_at_its_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    config_mod = importlib.import_module("gateway.config")
    services: dict[str, Any] = yaml.safe_load(COMPOSE_CLUSTER.read_text())["services"]
    nodes = [n for n in services if n.startswith("redis-node-")]
    assert len(nodes) == 6
    for n in nodes:
        assert "--cluster-enabled yes" in command_text(services[n])
    assert "--cluster-replicas 1" in command_text(services["cluster-init"])
    gateway = services["gateway"]
    assert "./config.cluster.yaml:/etc/session-gateway/config.yaml:ro" in gateway["volumes"]
    assert exec_form("CMD")[-1] == "/etc/session-gateway/config.yaml"
    monkeypatch.delenv("COOKIE_SECURE", raising=False)
    settings = config_mod.load_settings(str(CLUSTER_CONFIG))
    assert settings.redis.topology == "cluster"
    for node in settings.redis.cluster.nodes:
        assert node.partition(":")[0] in services
    # Apart from redis:, the two configs are the same gateway.
    plain = yaml.safe_load(DEPLOY_CONFIG.read_text())
    cluster = yaml.safe_load(CLUSTER_CONFIG.read_text())
    plain.pop("redis"), cluster.pop("redis")
    assert plain == cluster
