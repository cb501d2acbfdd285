# What podman needs on the machines the suite runs on (containers themselves: no CAP_SYS_RESOURCE, cgroups v1
# beside a v2 hierarchy): runc (crun refuses the hybrid cgroups), and resource limits no higher than the
# machine's own (podman's defaults would raise them, which needs CAP_SYS_RESOURCE). Harmless elsewhere.
# Read by scripts/image.sh; sidecarless/lab/image.py gives the containers it runs the same.
PODMAN_GLOBAL=(--runtime runc)
PODMAN_RUN=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=16384:16384")
