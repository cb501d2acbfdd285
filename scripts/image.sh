#!/usr/bin/env bash
# `make image`: the DaemonSet's image built on this machine, no registry needed: the base from Debian's archive
# (mmdebstrap, with this machine's apt sources), then the Dockerfile built by podman. Idempotent: the base is
# made once, podman's layer cache keeps the dependencies while only the code changes.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/apt-install.sh
source scripts/apt-install.sh
apt_install image podman buildah mmdebstrap runc

# shellcheck source=scripts/podman-flags.sh
source scripts/podman-flags.sh
version=$(.venv/bin/python -c 'import sidecarless; print(sidecarless.__version__)')
base=localhost/sidecarless-debian:bookworm
image=${IMAGE:-localhost/sidecarless:$version}

if ! podman image exists "$base"; then
  sources=()
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$file" ] && sources+=("$file")
  done
  echo "image: $base from Debian's archive (mmdebstrap, sources: ${sources[*]})"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm - "${sources[@]}" | podman import - "$base"
fi

# --network host: the build's downloads (Debian's archive, PyPI) leave from this machine's own network; podman's
# default network would add a bridge and firewall rules to it.
# The CA bundle this machine's own pip trusts (PIP_CERT, or the system's), lent to the build: a network that
# intercepts TLS is then trusted inside it too.
ca_bundle=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
podman "${PODMAN_GLOBAL[@]}" build "${PODMAN_RUN[@]}" --network host --build-arg "BASE=$base" \
  --volume "$ca_bundle:/run/build-ca-bundle.crt:ro" --build-arg BUILD_CA_BUNDLE=/run/build-ca-bundle.crt \
  -t "$image" .
echo "image: $image ($(podman image inspect "$image" --format '{{.Size}}' | awk '{printf "%.0f MiB", $1 / 1048576}'))"
podman image prune -f > /dev/null
