"""Delta (incremental) ADS: per type, each response carries only the resources that changed or went away.

- subscription changes count even on a stale nonce; ACK and NACK are matched by nonce;
- a NACKed resource version is not sent again; names asked for before they exist are reported missing once;
- a reconnecting Envoy says what it holds (initial_resource_versions): only differences are sent;
- listeners wait while clusters are in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from sidecarless.observe.logs import LogKey
from sidecarless.xds.acks import Stream
from sidecarless.xds.resources import CLUSTER_TYPE, FULL_SET_TYPES, LISTENER_TYPE, TYPE_ORDER
from sidecarless.xds.snapshot import version_of

log = logging.getLogger(__name__)


@dataclass
class _DeltaSubscription:
    """What Envoy holds of a type, per resource, and what it asked for."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)  # name -> version (digest) Envoy accepted
    in_flight: dict[str, tuple[dict[str, str], list[str]]] = field(default_factory=dict)  # nonce -> sent, removed
    rejected: dict[str, str] = field(default_factory=dict)  # name -> digest Envoy rejected: not sent again
    reported_missing: set[str] = field(default_factory=set)  # asked for before they exist: said so once
    started: bool = False


class DeltaStream(Stream[_DeltaSubscription]):
    """The subscriptions of one delta stream, and what Envoy accepted on it."""

    def receive(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = request.type_url
        subscription = self._subscriptions.setdefault(type_url, _DeltaSubscription())
        first, subscription.started = not subscription.started, True
        if first and type_url in FULL_SET_TYPES and not request.resource_names_subscribe:
            subscription.wildcard = True
        for name in request.resource_names_subscribe:
            if name == "*":
                subscription.wildcard = True
            else:
                subscription.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                subscription.wildcard = False
            subscription.names.discard(name)
            subscription.held.pop(name, None)
            subscription.reported_missing.discard(name)
        if first and request.initial_resource_versions:
            # Envoy reconnected (the agent restarted): it holds these; only differences are sent.
            subscription.held.update(request.initial_resource_versions)
            log.info(
                "envoy reconnected holding resources",
                extra={LogKey.TYPE_URL: type_url, LogKey.RESOURCES: len(subscription.held)},
            )
        in_flight = subscription.in_flight.pop(request.response_nonce, None) if request.response_nonce else None
        if in_flight is not None:
            sent, removed = in_flight
            if request.HasField("error_detail"):
                subscription.rejected.update(sent)
                self._rejected(type_url, request.error_detail.message, {LogKey.RESOURCES: sorted(sent)})
            else:
                subscription.held.update(sent)
                for name in removed:
                    subscription.held.pop(name, None)
                self._acks.rejected.pop(type_url, None)
                self._events.on_ack(type_url)
        self._acks.accepted[type_url] = {
            name: version
            for name, version in subscription.held.items()
            if subscription.wildcard or name in subscription.names
        }

    def responses(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        responses = []
        for type_url in TYPE_ORDER:
            subscription = self._subscriptions.get(type_url)
            if subscription is None or not subscription.started:
                continue
            clusters = self._subscriptions.get(CLUSTER_TYPE)
            if type_url == LISTENER_TYPE and clusters is not None and clusters.in_flight:
                continue  # make before break: listeners only once Envoy has the clusters they use
            response = self._response(type_url, subscription)
            if response is not None:
                responses.append(response)
        return responses

    def _response(self, type_url: str, subscription: _DeltaSubscription) -> discovery_pb2.DeltaDiscoveryResponse | None:
        snapshot = self._snapshot()
        resources = snapshot.resources.get(type_url, {})
        in_scope = set(resources) if subscription.wildcard else subscription.names & set(resources)
        flying = {name: digest for sent, _ in subscription.in_flight.values() for name, digest in sent.items()}
        flying_removed = {name for _, removed in subscription.in_flight.values() for name in removed}
        changed = [
            resources[name]
            for name in sorted(in_scope)
            if resources[name].digest
            not in (subscription.held.get(name), flying.get(name), subscription.rejected.get(name))
        ]
        gone = sorted(name for name in subscription.held if name not in in_scope and name not in flying_removed)
        missing = sorted(subscription.names - set(resources) - subscription.reported_missing - set(subscription.held))
        if not changed and not gone and not missing:
            return None
        nonce = self._next_nonce(type_url, snapshot)
        subscription.in_flight[nonce] = ({resource.name: resource.digest for resource in changed}, gone)
        subscription.reported_missing |= set(missing)
        subscription.reported_missing -= {resource.name for resource in changed}
        log.info(
            "sending configuration (delta)",
            extra={"type_url": type_url, "resources": len(changed), "removed": len(gone) + len(missing)},
        )
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version_of(resources[name] for name in in_scope),
            resources=[
                discovery_pb2.Resource(name=resource.name, version=resource.digest, resource=resource.body)
                for resource in changed
            ],
            removed_resources=[*gone, *missing],
            type_url=type_url,
            nonce=nonce,
        )
