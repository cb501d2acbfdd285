"""How the agent reaches Kubernetes (the agent's flags; sources/kubernetes.py reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecarless.policy.model import DEFAULT_CLUSTER_NAME

# The API server ends a watch after this long; bookmarks arrive about once a minute meanwhile.
WATCH_TIMEOUT_S = 300


@dataclass(frozen=True)
class KubernetesConfig:
    node_name: str
    api_server: str | None = None  # a URL without credentials (tests, the lab's fake); else kubeconfig or in-cluster
    kubeconfig: Path | None = None
    cluster_name: str = DEFAULT_CLUSTER_NAME
    devices: tuple[str, ...] = ()  # non-pod interfaces traffic enters the node by
    watch_timeout_s: int = WATCH_TIMEOUT_S


class KubeConfigError(Exception):
    """Credentials the agent cannot use: which file, which field, why."""
