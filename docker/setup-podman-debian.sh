#!/bin/sh
# Prepare a Debian (bookworm) machine without a Docker engine and without access to a
# container registry so that rootful podman can build and run the qsmflow image.
#
# What it does (each step can be skipped, see the options):
#   1. apt-get install podman, runc and debootstrap;
#   2. writes a containers.conf that selects runc (crun fails on some cgroup layouts) and sets
#      nofile/nproc ulimits for containers and builds;
#   3. builds a local base image with `debootstrap --variant=minbase bookworm`, adds the
#      host's extra CA certificates (/usr/local/share/ca-certificates/*.crt, e.g. of an HTTPS
#      proxy) and tags it with the name the Dockerfile's FROM uses (debian:bookworm-slim).
#
# Usage (as root):
#   sh docker/setup-podman-debian.sh [--no-install] [--no-base] [--conf FILE] [--tag NAME]
# then
#   export CONTAINERS_CONF=/etc/containers/qsmflow-containers.conf   (or the --conf FILE)
#   podman build -f docker/Dockerfile -t qsmflow:0.1.0 .
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), NOFILE (20000),
# NPROC (32768), CA_DIR (/usr/local/share/ca-certificates).
set -eu

CONF=/etc/containers/qsmflow-containers.conf
TAG=debian:bookworm-slim
INSTALL=1
BASE=1
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NOFILE=${NOFILE:-20000}
NPROC=${NPROC:-32768}
CA_DIR=${CA_DIR:-/usr/local/share/ca-certificates}

while [ $# -gt 0 ]; do
    case "$1" in
        --no-install) INSTALL=0 ;;
        --no-base) BASE=0 ;;
        --conf) CONF=$2; shift ;;
        --tag) TAG=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "setup-podman-debian.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" != 0 ]; then
    echo "setup-podman-debian.sh: run as root (rootful podman, debootstrap and apt-get need it)" >&2
    exit 1
fi

if [ "$INSTALL" = 1 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap
fi

mkdir -p "$(dirname "$CONF")"
cat > "$CONF" <<EOF
# Written by qsmflow docker/setup-podman-debian.sh; use with: export CONTAINERS_CONF=$CONF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
echo "wrote $CONF"
export CONTAINERS_CONF="$CONF"

if [ "$BASE" = 1 ]; then
    ROOT=$(mktemp -d /var/tmp/qsmflow-base.XXXXXX)
    trap 'rm -rf "$ROOT"' EXIT
    debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOT" "$MIRROR"
    # Same apt sources as the official image (main suite, updates, security).
    rm -f "$ROOT/etc/apt/sources.list"
    cat > "$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Slim like the official image: dpkg leaves out docs, man pages and translations.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/lintian/*' 'path-exclude /usr/share/locale/*' \
        'path-include /usr/share/locale/locale.alias' > "$ROOT/etc/dpkg/dpkg.cfg.d/slim"
    find "$ROOT/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/lintian/*
    find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    # The host's extra CA certificates (HTTPS proxy), so that apt, pip and curl in builds
    # trust it; pip and requests are pointed at the system bundle through ENV below.
    if ls "$CA_DIR"/*.crt >/dev/null 2>&1; then
        cp "$CA_DIR"/*.crt "$ROOT/usr/local/share/ca-certificates/"
    fi
    chroot "$ROOT" update-ca-certificates
    chroot "$ROOT" apt-get clean
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/*.log \
        "$ROOT"/tmp/* "$ROOT"/var/tmp/*
    bundle=/etc/ssl/certs/ca-certificates.crt
    tar -C "$ROOT" --numeric-owner -c . | podman import \
        --change "ENV PIP_CERT=$bundle" \
        --change "ENV REQUESTS_CA_BUNDLE=$bundle" \
        --change "ENV SSL_CERT_FILE=$bundle" \
        --change 'CMD ["bash"]' \
        - "$TAG"
    echo "tagged local base image $TAG"
fi

podman --version
echo "done; now: export CONTAINERS_CONF=$CONF"
