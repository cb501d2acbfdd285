"""The xDS types sidecarless serves, and the order a change reaches Envoy in. Pure constants."""

from __future__ import annotations

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# The order a change reaches Envoy in: clusters before the listeners whose routes use them, listeners
# before their routes (Envoy asks for routes once it has the listener).
TYPE_ORDER = (CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE)
# Types whose response carries the full set (a missing name is removed); the others are sent by name.
FULL_SET_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})
