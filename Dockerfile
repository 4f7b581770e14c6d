# syntax=docker/dockerfile:1
# canary-proxy: slim runtime image, non-root, dependencies in their own cached layer.

FROM python:3.11-slim AS build
# The compiler only lives in this stage: setup.py compiles the data plane's hot modules with
# mypyc, and the final image gets the built wheel, not the tools.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first: this layer is reused until pyproject.toml changes. Binary wheels only
# (aiohttp's pure-Python parser is never installed).
COPY pyproject.toml setup.py README.md ./
RUN mkdir proxy && touch proxy/__init__.py \
 && CANARY_PROXY_COMPILE=0 pip install --no-cache-dir --only-binary=:all: . \
 && pip uninstall -y canary-proxy
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip install --no-cache-dir --no-deps /wheels/*.whl \
 && python -c "import proxy.dataplane.server as s; assert s.__file__.endswith('.so'), s.__file__"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/canary-proxy --create-home canary
COPY --from=build /opt/venv /opt/venv
# The example config, made to listen on every interface and keep state in the user's home.
# Mount your own at /etc/canary-proxy/proxy.yaml. The folder belongs to the proxy's user:
# `PUT /config` writes the new file next to the old one and renames it into place.
COPY --chown=canary:canary config/proxy.yaml /etc/canary-proxy/proxy.yaml
RUN chown canary:canary /etc/canary-proxy \
 && sed -i -e 's|^listen: "127.0.0.1:8080"|listen: "0.0.0.0:8080"|' \
           -e 's|^state_dir: ./state|state_dir: /var/lib/canary-proxy/state|' \
        /etc/canary-proxy/proxy.yaml \
 && grep -q '^listen: "0.0.0.0:8080"' /etc/canary-proxy/proxy.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CANARY_PROXY_CONFIG=/etc/canary-proxy/proxy.yaml
USER canary
WORKDIR /var/lib/canary-proxy
EXPOSE 8080 9901
# Liveness from the admin listener (loopback inside the container is enough for the check).
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:9901/healthz', timeout=1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["canary-proxy"]
CMD ["run"]
