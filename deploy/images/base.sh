#!/bin/sh
# A local base image for machines that cannot pull one: Debian (the release below) from this
# machine's own Debian mirror via debootstrap, with Python 3.11 and its venv module, imported
# into the Docker engine as $FLUXO_BASE_IMAGE (default fluxo-base:bookworm).
#
#   deploy/images/base.sh            build it unless the engine has it already
#   deploy/images/base.sh --force    build it again
#
# The image trusts what this machine trusts: the CA bundle pip is configured with here (pip
# config's `cert`, else PIP_CERT, else the system bundle) replaces the image's, so pip and apt
# inside the builds reach the same registries through the same proxy as the host does.
# Needs root (debootstrap), debootstrap itself (Debian package) and a running Docker engine.
set -eu

image="${FLUXO_BASE_IMAGE:-fluxo-base:bookworm}"
release="${FLUXO_BASE_RELEASE:-bookworm}"
mirror="${FLUXO_BASE_MIRROR:-http://deb.debian.org/debian}"

if [ "${1:-}" != "--force" ] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image is there (deploy/images/base.sh --force builds it again)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: building the base image $image needs root (debootstrap); run it as root, or pull a base and set BASE_IMAGE" >&2
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "error: debootstrap is not installed; apt-get install debootstrap (Debian package)" >&2
    exit 1
}

ca_bundle() {  # the CA bundle pip uses on this machine
    for candidate in "$(pip config get global.cert 2>/dev/null || true)" "${PIP_CERT:-}" \
                     /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$candidate" ] && [ -s "$candidate" ]; then echo "$candidate"; return; fi
    done
}

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fluxo-base.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT INT TERM
echo "debootstrap $release from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$release" "$rootfs" "$mirror" \
    > "$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
bundle="$(ca_bundle)"
[ -n "$bundle" ] && cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "built base image $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
