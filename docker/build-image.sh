#!/usr/bin/env bash
# Build the kvs image without an image registry:
#   docker/build-image.sh [TAG]        (default TAG: kvs:latest)
#
# 1. base: python:3.11-slim if it is present locally, else kvs-base:bookworm (docker/make-base.sh);
# 2. docker/wheelhouse/: the project's dependencies as cp311 manylinux x86_64 wheels, downloaded
#    from PyPI on the host unless the wheelhouse already has everything (checked offline);
# 3. docker build --build-arg PIP_NO_INDEX=1: the image build itself needs no network.
# Docker's layer cache makes a second run take seconds.
set -euo pipefail

TAG="${1:-kvs:latest}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELHOUSE="$HERE/wheelhouse"
PYTHON="${PYTHON:-python3}"

log() { echo "build-image: $*" >&2; }

command -v docker >/dev/null || { log "docker is not installed"; exit 1; }
docker info >/dev/null 2>&1 || { log "cannot talk to the Docker daemon"; exit 1; }

# -- 1. base image -------------------------------------------------------------------------
if docker image inspect python:3.11-slim >/dev/null 2>&1; then
    BASE=python:3.11-slim
else
    BASE=kvs-base:bookworm
    log "python:3.11-slim is not available locally: using $BASE"
    "$HERE/make-base.sh" "$BASE"
fi

# -- 2. wheelhouse ---------------------------------------------------------------------------
# Requirements: [project].dependencies and [build-system].requires of pyproject.toml (setuptools,
# for building kvs itself under pip's build isolation), plus wheel for older setuptools.
mapfile -t REQS < <("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:           # Python < 3.11
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
for req in data["project"]["dependencies"] + data["build-system"]["requires"] + ["wheel"]:
    print(req)
EOF
)
((${#REQS[@]})) || { log "cannot read the dependencies from pyproject.toml with $PYTHON (needs Python >= 3.11 or tomli)"; exit 1; }
# Wheels for CPython 3.11 on x86_64 glibc (bookworm has glibc 2.36); pure wheels are always accepted.
PIP_TARGET=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
            --platform manylinux1_x86_64)
PIP=("$PYTHON" -m pip --disable-pip-version-check download --quiet --dest "$WHEELHOUSE" "${PIP_TARGET[@]}")

mkdir -p "$WHEELHOUSE"
if "${PIP[@]}" --no-index --find-links "$WHEELHOUSE" "${REQS[@]}" >/dev/null 2>&1; then
    log "wheelhouse already satisfies pyproject.toml (cached): $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels"
else
    # Pure-Python requirements that PyPI has only as sdists: build their wheels here first.
    for req in "${REQS[@]}"; do
        if [[ "${req,,}" == pysyncobj* ]]; then
            log "building a wheel for $req (PyPI has only an sdist; pure Python)"
            "$PYTHON" -m pip --disable-pip-version-check wheel --quiet --no-deps --wheel-dir "$WHEELHOUSE" "$req"
        fi
    done
    log "downloading wheels for ${REQS[*]} into docker/wheelhouse/"
    "${PIP[@]}" --find-links "$WHEELHOUSE" "${REQS[@]}"
    log "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels"
fi

# -- 3. image --------------------------------------------------------------------------------
log "building $TAG from $BASE"
OLD_ID="$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)"
BUILD_LOG="$(mktemp -t kvs-build.XXXXXX.log)"
if ! docker build --force-rm --build-arg BASE_IMAGE="$BASE" --build-arg PIP_NO_INDEX=1 -t "$TAG" "$ROOT" >"$BUILD_LOG" 2>&1; then
    log "docker build failed; last lines of $BUILD_LOG:"
    tail -n 30 "$BUILD_LOG" >&2
    exit 1
fi
rm -f "$BUILD_LOG"
NEW_ID="$(docker image inspect --format '{{.Id}}' "$TAG")"
if [[ -n "$OLD_ID" && "$OLD_ID" != "$NEW_ID" ]]; then
    docker rmi "$OLD_ID" >/dev/null 2>&1 || true     # the replaced image, unless a container still uses it
fi
log "done: $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
