# The orders service as an image. `docker compose up --build -d` builds and runs it; see the
# "Docker" section of README.md. No `# syntax=` line: it would make BuildKit pull a frontend
# image, and the built-in one supports the cache and bind mounts used here. Stages:
#   builder     wheels of the project and of every runtime dependency
#   test-wheels the builder plus wheels of the test extra (which brings the embedded servers)
#   base        python:3.11-slim, the app user and a venv with the project's wheel installed:
#               no pip, setuptools or wheel in it, nor the "embedded" extra (compose sets URLs)
#   test        base plus the test extra and the source tree (`docker compose run --rm test`)
#   runtime     the service; the last stage, so a plain `docker build .` gives it
# tests/test_containers.py runs the pip commands and the CMD below outside Docker.

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.md is the package's long description. streams/schema.sql is a symlink to
# ../init-db/01-schema.sql: with init-db/ in place the wheel carries the file itself.
COPY pyproject.toml setup.cfg README.md ./
COPY init-db/ init-db/
COPY streams/ streams/
COPY views/ views/
COPY bridge/ bridge/
COPY publisher/ publisher/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels .

FROM builder AS test-wheels
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels --find-links /wheels ".[test]"

FROM python:3.11-slim AS base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 orders \
    && useradd --system --uid 10001 --gid orders --home-dir /var/lib/orders \
        --shell /usr/sbin/nologin orders \
    && install --directory --owner=orders --group=orders --mode=0750 /var/lib/orders
# Only the project's wheel and what it requires, from the builder's wheels and nothing else.
# The image's own pip fills the venv (--python), so the venv holds no packaging tools.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links /wheels /wheels/orders_stream-*.whl

FROM base AS test
# DL3013 asks for pinned versions: pip sees no index here, only the wheels that test-wheels
# built from this tree, so it installs exactly those.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=test-wheels,source=/wheels,target=/wheels \
    set -- /wheels/orders_stream-*.whl \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links /wheels "$1[test]"
# The app user owns /app itself too, so pytest can keep its cache there.
RUN install --directory --owner=orders --group=orders /app
WORKDIR /app
COPY --chown=10001:10001 . .
USER 10001:10001
CMD ["pytest", "-q"]

FROM base AS runtime
ENV ORDERS_WEB_HOST=0.0.0.0 \
    ORDERS_WEB_PORT=8080 \
    ORDERS_DATA_DIR=/var/lib/orders
WORKDIR /var/lib/orders
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ORDERS_WEB_PORT', '8080') + '/readyz', timeout=4)"]
# Exec form: the worker is PID 1 and gets SIGTERM itself, then commits and acks the batch in
# hand before it exits (compose gives it stop_grace_period for that).
STOPSIGNAL SIGTERM
CMD ["faust", "-A", "streams.app", "worker", "-l", "info"]
