"""Envoy's bootstrap: everything dynamic over ADS on the agent's Unix socket, admin on a Unix socket. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

XDS_CLUSTER = "sidecarless-xds"
# Percent of forwarded requests sent to the agent's access log (denied ones and errors always are): 0 unless a
# monitor watches or the operator asked for all (`agent --l7-access-log all`). Logging every request costs
# more than the rest of the L7 path (docs/benchmarks.md).
ACCESS_LOG_FORWARDED_KEY = "sidecarless.access_log.forwarded_percent"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def bootstrap(
    node_id: str,
    xds_socket: str,
    admin_socket: str,
    runtime: Mapping[str, object] | None = None,
    delta: bool = False,
) -> dict[str, Any]:
    """`runtime`: Envoy runtime values (a static layer), e.g. re2.max_program_size.error_level.
    `delta`: incremental xDS instead of state of the world."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    document: dict[str, Any] = {
        "node": {"id": node_id, "cluster": "sidecarless"},
        "admin": {"address": {"pipe": {"path": admin_socket, "mode": 0o660}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect soon after an agent restart: the stream carries every policy change, and
                            # a restarted agent is ready once Envoy is back (a retry on a Unix socket costs
                            # nothing; with 1 s at most, readiness waited up to a second after the agent was up).
                            "retry_policy": {"retry_back_off": {"base_interval": "0.05s", "max_interval": "0.25s"}},
                        }
                    }
                ],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        HTTP_PROTOCOL_OPTIONS: {
                            "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": xds_socket}}}}]}],
                    },
                }
            ]
        },
    }
    # The admin layer lets the agent switch values (the access log) without a restart.
    document["layered_runtime"] = {
        "layers": [{"name": "sidecarless", "static_layer": dict(runtime or {})}, {"name": "admin", "admin_layer": {}}]
    }
    return document
