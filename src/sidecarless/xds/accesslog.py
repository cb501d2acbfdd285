"""Envoy's access log service (ALS) on the agent's gRPC server: every request the proxy decided.

The HTTP connection managers log to it over the xDS socket with a 10 ms flush interval, so an L7 verdict
reaches `sidecarless monitor` within milliseconds of the request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from sidecarless.policy.model import EGRESS, INGRESS
from sidecarless.xds.render import RBAC_METADATA, audit_result_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLogEntry:
    log_name: str  # the filter chain: "ingress/ns/pod" or "egress/ns/pod"
    time: float
    client_ip: str
    client_port: int
    destination_ip: str  # the original destination
    destination_port: int
    method: str
    path: str
    status: int
    details: str  # Envoy's response_code_details
    duration_ms: float
    # In an audited chain: "allowed" or "denied", what the audit verdict (RBAC shadow rules) says; else None.
    audit: str | None = None
    host: str = ""  # :authority
    # The HTTP rule (RBAC shadow policy name) that matched on each side ("egress", "ingress"); absent: none did.
    matched: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # those a rule of the chain names (render.py), as sent

    @property
    def verdict(self) -> str:
        if self.details.startswith("rbac_access_denied"):
            return "Denied"
        if self.details == "via_upstream":
            return "Forwarded"
        return "Error"


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, on_entry: Callable[[HttpLogEntry], None]) -> None:
        self._on_entry = on_entry

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        log_name = ""
        async for message in request_iterator:
            if message.HasField("identifier"):
                log_name = message.identifier.log_name  # only the first message of a stream carries it
            for entry in message.http_logs.log_entry:
                self._on_entry(_entry(log_name, entry))
        return als_pb2.StreamAccessLogsResponse()


def _entry(log_name: str, entry: accesslog_pb2.HTTPAccessLogEntry) -> HttpLogEntry:
    common = entry.common_properties
    remote = common.downstream_direct_remote_address.socket_address
    local = common.downstream_local_address.socket_address
    duration = common.duration.ToMilliseconds() if common.HasField("duration") else 0
    return HttpLogEntry(
        log_name=log_name,
        time=common.start_time.ToMilliseconds() / 1000,
        client_ip=remote.address,
        client_port=remote.port_value,
        destination_ip=local.address,
        destination_port=local.port_value,
        method=base_pb2.RequestMethod.Name(entry.request.request_method),
        path=entry.request.path,
        status=entry.response.response_code.value,
        details=entry.response.response_code_details,
        duration_ms=float(duration),
        audit=_audit_result(common),
        matched=_matched(common),
        host=entry.request.authority,
        headers=tuple(sorted(entry.request.request_headers.items())),
    )


AUDIT_RESULT_KEYS = tuple(audit_result_key(group) for group in (EGRESS, INGRESS))


def _matched(common: accesslog_pb2.AccessLogCommon) -> tuple[tuple[str, str], ...]:
    rbac = common.metadata.filter_metadata.get(RBAC_METADATA)
    if rbac is None:
        return ()
    found = ((group, rbac.fields.get(f"{group}_shadow_effective_policy_id")) for group in (EGRESS, INGRESS))
    return tuple((group, value.string_value) for group, value in found if value is not None and value.string_value)


def _audit_result(common: accesslog_pb2.AccessLogCommon) -> str | None:
    """Denied if any audit group denies (egress and the destination's ingress are both checked)."""
    rbac = common.metadata.filter_metadata.get(RBAC_METADATA)
    if rbac is None:
        return None
    results = [rbac.fields[key].string_value for key in AUDIT_RESULT_KEYS if key in rbac.fields]
    if not results:
        return None
    return "denied" if "denied" in results else "allowed"


def add_to_server(service: AccessLogService, server: grpc.aio.Server) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(service, server)
