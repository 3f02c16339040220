# One kvs node per container: the seeds' contract (ADDRESS, VIEW, REPL_FACTOR, port 13800)
# plus KVS_SECRET and DATA_DIR (a volume).
#
#   docker build -t kvs .                        # a normal Docker: pulls python:3.11-slim, pip from PyPI
#   docker/build-image.sh                         # no registry: local base image + host wheelhouse
#
# BASE_IMAGE must provide python3 (>= 3.10) with the venv module and useradd.
ARG BASE_IMAGE=python:3.11-slim

# -- build: a virtualenv with kvs and its dependencies (wheels and sources stay in this stage)
FROM ${BASE_IMAGE} AS build
# PIP_NO_INDEX=1 makes the build use only docker/wheelhouse (no network at build time).
ARG PIP_NO_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/wheelhouse/ /tmp/wheels/
COPY pyproject.toml README.md /src/
# Dependencies first, with a stub package, so that editing kvs/ does not reinstall them.
RUN python3 -m venv /opt/kvs && mkdir /src/kvs && touch /src/kvs/__init__.py \
 && PIP_NO_INDEX=${PIP_NO_INDEX} /opt/kvs/bin/pip install --find-links /tmp/wheels /src
COPY kvs /src/kvs
RUN PIP_NO_INDEX=${PIP_NO_INDEX} /opt/kvs/bin/pip install --find-links /tmp/wheels --no-deps --force-reinstall /src \
 && /opt/kvs/bin/pip uninstall --yes --quiet pip setuptools

# -- runtime
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/kvs/bin:$PATH \
    ADDRESS=127.0.0.1:13800 \
    REPL_FACTOR=1 \
    DATA_DIR=/data
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin kvs \
 && mkdir -p /data && chown kvs:kvs /data
USER kvs
VOLUME /data
EXPOSE 13800
# Liveness, not readiness: Docker (and what restarts on "unhealthy") must not act on a node whose group
# is electing a leader, or on an idle spare; load balancers ask /readyz themselves.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["kvs", "health", "--live"]
ENTRYPOINT ["kvs", "serve"]
# Last, so that a change to kvs/ rebuilds only this layer of the runtime stage.
COPY --from=build /opt/kvs /opt/kvs
