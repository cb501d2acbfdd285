"""Immutable, consistency-checked sets of Envoy resources, with content-hash versions. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2

from sidecarless.xds.render import Resources, pack
from sidecarless.xds.resources import CLUSTER_TYPE, FULL_SET_TYPES, LISTENER_TYPE, ROUTE_TYPE, TYPE_ORDER


class InconsistentSnapshot(ValueError):
    """A bug in rendering: a listener names a route, or a route a cluster, that is not in the snapshot."""


@dataclass(frozen=True)
class Resource:
    name: str
    body: any_pb2.Any
    digest: str  # content hash of the serialised resource


@dataclass(frozen=True)
class Snapshot:
    resources: Mapping[str, Mapping[str, Resource]]  # type URL -> name -> resource

    @staticmethod
    def from_resources(rendered: Resources) -> Snapshot:
        resources: dict[str, dict[str, Resource]] = {}
        for type_url in TYPE_ORDER:
            by_name = rendered.by_type.get(type_url, {})
            resources[type_url] = {}
            for name in sorted(by_name):
                body = pack(by_name[name])
                digest = hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()[:16]
                resources[type_url][name] = Resource(name, body, digest)
        snapshot = Snapshot(resources)
        snapshot.check_consistency()
        return snapshot

    def select(self, type_url: str, names: Iterable[str] | None) -> list[Resource]:
        """The resources a subscription gets: all of them for full-set types, else the requested names
        that exist (names requested before they exist are served once they appear)."""
        by_name = self.resources.get(type_url, {})
        if names is None or type_url in FULL_SET_TYPES:
            return list(by_name.values())
        return [by_name[name] for name in sorted(set(names)) if name in by_name]

    def digests(self, type_url: str) -> dict[str, str]:
        return {name: resource.digest for name, resource in self.resources.get(type_url, {}).items()}

    def check_consistency(self) -> None:
        routes = self.resources.get(ROUTE_TYPE, {})
        clusters = self.resources.get(CLUSTER_TYPE, {})
        for listener in self.resources.get(LISTENER_TYPE, {}).values():
            message = listener_pb2.Listener()
            listener.body.Unpack(message)
            for chain in message.filter_chains:
                for network_filter in chain.filters:
                    manager = hcm_pb2.HttpConnectionManager()
                    if network_filter.typed_config.Unpack(manager) and manager.HasField("rds"):
                        name = manager.rds.route_config_name
                        if name not in routes:
                            raise InconsistentSnapshot(f"listener {message.name} uses missing route {name}")
        for route in routes.values():
            configuration = route_pb2.RouteConfiguration()
            route.body.Unpack(configuration)
            for virtual_host in configuration.virtual_hosts:
                for entry in virtual_host.routes:
                    if entry.route.cluster and entry.route.cluster not in clusters:
                        raise InconsistentSnapshot(
                            f"route {configuration.name} uses missing cluster {entry.route.cluster}"
                        )


def version_of(resources: Iterable[Resource]) -> str:
    """Content-hash version of what one response carries: the same resources give the same version."""
    digest = hashlib.sha256()
    for resource in sorted(resources, key=lambda item: item.name):
        digest.update(f"{resource.name}={resource.digest};".encode())
    return digest.hexdigest()[:16]
