#!/usr/bin/env bash
# Builds a local stand-in for the `python:3.11-slim` base image that BentoML's Dockerfile starts FROM,
# for hosts that cannot pull from a registry: Debian bookworm (Python 3.11) by debootstrap, with uv and
# the build tools the Dockerfile would install, imported with `podman import`. A host whose PyTorch CPU
# wheel lies in a local folder (WHEELS, default /opt/wheels) gets it copied in and found through
# UV_FIND_LINKS, so the image installs the CPU build instead of PyPI's CUDA one.
set -euo pipefail
TAG=${TAG:-docker.io/library/python:3.11-slim}
WHEELS=${WHEELS:-/opt/wheels}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
UV=${UV:-$(command -v uv || echo .venv/bin/uv)}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
ROOT=$(mktemp -d /var/tmp/shardbento-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT

if podman image exists "$TAG"; then echo "base image $TAG exists"; exit 0; fi
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,gnupg2,git,build-essential,curl \
  bookworm "$ROOT" "$MIRROR"
ln -sf python3 "$ROOT/usr/bin/python"
install -m 0755 "$UV" "$ROOT/usr/local/bin/uv"
# Hosts behind a TLS-inspecting proxy trust its CA through their own bundle: the image needs the same one.
if [ -f "$HOST_CA" ]; then cp "$HOST_CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"; fi
mkdir -p "$ROOT/opt/wheels"
cp "$WHEELS"/torch-*cpu*.whl "$ROOT/opt/wheels/" 2>/dev/null || true
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/archives/*.deb
tar -C "$ROOT" -c . | podman import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin' \
  --change 'ENV UV_FIND_LINKS=/opt/wheels' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV UV_NATIVE_TLS=1' \
  --change 'CMD ["python3"]' - "$TAG"
echo "built $TAG"
