# syntax=docker/dockerfile:1
# shoal in a container: one instance serving the applications of /app/serve_config.yaml.
#
#   docker build -t shoal:latest .
#   docker run --rm -p 8000:8000 -p 8080:8080 shoal:latest      # the example app (examples/hello.py)
#
# Your own image: FROM shoal:latest, COPY your modules into /app and your config file to
# /app/serve_config.yaml (or mount it there: Kubernetes mounts the ConfigMap `shoal-serve-config`,
# key `serve_config.yaml`). shoal binds 127.0.0.1 unless told: to be reachable from outside the
# container, the config file sets `http_options: {host: 0.0.0.0}` (as examples/serve_config.yaml
# does), or pass `--host 0.0.0.0` after the config path.
#
# On SIGTERM (docker stop, a pod's deletion) /-/healthz answers 503 at once, requests in flight
# get up to http_options.graceful_shutdown_timeout_s (default 20 s) to finish, replicas drain,
# and the process exits 0. Give it longer than that before SIGKILL (`docker stop -t 30`,
# terminationGracePeriodSeconds).
#
# The root filesystem may be read-only: shoal writes only under SHOAL_RUN_DIR (/tmp/shoal, created
# 0700 by shoal: mount a writable volume at /tmp, not at /tmp/shoal) and /dev/shm (arrays of 4 MiB
# or more between deployments).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the project's wheel (nothing from this stage but the wheel reaches the image) --------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shoal ./shoal
COPY runtime ./runtime
COPY proxy ./proxy
COPY controller ./controller
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- the image -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SHOAL_RUN_DIR=/tmp/shoal
RUN groupadd --system --gid 10001 shoal \
    && useradd --system --uid 10001 --gid shoal --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin shoal
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels
WORKDIR /app
COPY examples/hello.py examples/serve_config.yaml /app/
USER 10001:10001
EXPOSE 8000 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/-/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["shoal", "run"]
CMD ["/app/serve_config.yaml"]
