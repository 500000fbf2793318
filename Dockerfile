# Session Gateway container image.
#
#   docker build -t session-gateway .
#   docker run -p 8080:8080 -v $PWD/config.yaml:/etc/session-gateway/config.yaml:ro session-gateway
#
# The baked-in config is deploy/config.yaml (the compose topology in deploy/compose.yaml);
# mount your own at /etc/session-gateway/config.yaml to replace it. The same image also
# runs the Fake Web Retailer demo shop (examples/), which compose uses as the backend:
#   entrypoint: ["python", "-m", "examples.fake_web_retailer"]
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Liveness on the admin listener (admin.listen in the config): /healthz answers while
    # the process does. Not /readyz: an orchestrator that replaces unhealthy containers
    # (Swarm) would restart every gateway while Redis is down, which fixes nothing.
    # Deployments whose health status only routes traffic can point this at /readyz
    # (deploy/compose.yaml does).
    GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz

WORKDIR /app

# Dependencies and the package first, so a change to examples/ or the config alone does
# not reinstall them.
COPY pyproject.toml ./
COPY gateway ./gateway
COPY plugins ./plugins
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin gateway

COPY examples ./examples
COPY deploy/config.yaml /etc/session-gateway/config.yaml

USER gateway
EXPOSE 8080 9090

HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTHCHECK_URL'], timeout=4)"]

ENTRYPOINT ["python", "-m", "gateway"]
CMD ["--config", "/etc/session-gateway/config.yaml"]
