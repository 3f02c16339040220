#!/usr/bin/env bash
# Make a Debian bookworm base image (python3 3.11 + venv) without any image registry:
#   docker/make-base.sh [TAG]        (default TAG: kvs-base:bookworm)
#
# The root filesystem is made once by debootstrap and cached in $KVS_ROOTFS
# (default /var/cache/kvs/rootfs-bookworm); the image is imported from it with apt
# lists, caches, docs, man pages and locales left out. Nothing is done when TAG exists.
set -euo pipefail

TAG="${1:-kvs-base:bookworm}"
ROOTFS="${KVS_ROOTFS:-/var/cache/kvs/rootfs-bookworm}"
MIRROR="${KVS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { echo "make-base: $*" >&2; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already exists (cached); remove it with 'docker rmi $TAG' to rebuild"
    exit 0
fi

# One make-base at a time per root filesystem: two debootstraps into one directory (a soak's image
# build beside the test suite's) removed each other's work and both failed.
mkdir -p "$(dirname "$ROOTFS")"
exec 9>"$ROOTFS.lock"
flock 9
if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG was made meanwhile"
    exit 0
fi

# A finished debootstrap removes its /debootstrap work directory; python3 must be there.
rootfs_complete() { [[ -x "$ROOTFS/usr/bin/python3" && -d "$ROOTFS/usr/lib/python3.11/venv" && ! -e "$ROOTFS/debootstrap" ]]; }

if ! rootfs_complete; then
    if [[ $EUID -ne 0 ]]; then
        log "debootstrap needs root: run as root, or point KVS_ROOTFS at a finished root filesystem"
        exit 1
    fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    if [[ -e "$ROOTFS" ]]; then
        log "$ROOTFS is incomplete: removing it"
        rm -rf --one-file-system "$ROOTFS"
    fi
    mkdir -p "$(dirname "$ROOTFS")"
    log "debootstrap bookworm into $ROOTFS (a few minutes; log: $ROOTFS.log)"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1; then
        log "debootstrap failed; last lines of $ROOTFS.log:"
        tail -n 20 "$ROOTFS.log" >&2
        exit 1
    fi
    rootfs_complete || { log "debootstrap finished but $ROOTFS has no python3 venv"; exit 1; }
fi

log "importing $ROOTFS as $TAG"
# Strip in the imported copy only: the cached rootfs stays a complete Debian system.
tar -C "$ROOTFS" --numeric-owner \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' --exclude='./tmp/*' \
    --exclude='./var/lib/apt/lists/*' --exclude='./var/cache/apt/*' --exclude='./var/cache/debconf/*-old' \
    --exclude='./var/log/*' \
    --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' \
    --exclude='./usr/share/locale/*' --exclude='./usr/share/lintian/*' \
    -c . \
  | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase bookworm + python3, python3-venv, ca-certificates" \
        - "$TAG" >/dev/null
log "done: $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
