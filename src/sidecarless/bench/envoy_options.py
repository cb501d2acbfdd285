"""Envoy's defaults on the L7 path, one at a time (issue 19): the benchmark's bare node Envoy, each option
changed alone, measured interleaved with the unchanged one. Pure: configurations and summaries.

A transparent policy proxy answers for nothing beyond its verdict: it has no use for a request ID of its own, for
`x-envoy-*` headers in requests and responses, for replacing the server's `server` header, or for per-request
statistics by upstream that nobody reads. What these cost is measured here; what sidecarless renders is the
`adopted` row (xds/render.py).

The rows marked "sidecarless:" go the other way: each adds to the bare Envoy one thing sidecarless's Envoy does
beyond the bare one's RBAC and router (xds/render.py), so the gap between the two is accounted for: path
normalization, the rule filter (an RBAC filter whose shadow rules name the HTTP rule that matched), the hit
counters (a stats access logger labelled per request) and the access log service (status >= 400 only, to a
gRPC collector).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from sidecarless.bench.results import medians_by

Bootstrap = dict[str, Any]


def _manager(bootstrap: Bootstrap) -> dict[str, Any]:
    manager: dict[str, Any] = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return manager


def _router(bootstrap: Bootstrap) -> dict[str, Any]:
    router: dict[str, Any] = _manager(bootstrap)["http_filters"][-1]["typed_config"]
    return router


def _no_request_id(bootstrap: Bootstrap) -> None:
    _manager(bootstrap)["generate_request_id"] = False


def _no_envoy_headers(bootstrap: Bootstrap) -> None:
    _router(bootstrap)["suppress_envoy_headers"] = True


def _server_header_passed(bootstrap: Bootstrap) -> None:
    _manager(bootstrap)["server_header_transformation"] = "PASS_THROUGH"


def _no_dynamic_stats(bootstrap: Bootstrap) -> None:
    _router(bootstrap)["dynamic_stats"] = False


def _small_buffers(bootstrap: Bootstrap) -> None:
    for resource in (*bootstrap["static_resources"]["listeners"], *bootstrap["static_resources"]["clusters"]):
        resource["per_connection_buffer_limit_bytes"] = 32 * 1024


def _no_stats(bootstrap: Bootstrap) -> None:
    bootstrap["stats_config"] = {"stats_matcher": {"reject_all": True}}


RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
# The bench's L7 rule (GET only): what every proxy of the benchmark allows, and what the rule filter names.
GET_ONLY = {"header": {"name": ":method", "string_match": {"exact": "GET"}}}
ALS_CLUSTER = "access-log-service"


def _path_normalization(bootstrap: Bootstrap) -> None:
    manager = _manager(bootstrap)
    manager["normalize_path"] = True
    manager["merge_slashes"] = True
    manager["path_with_escaped_slashes_action"] = "REJECT_REQUEST"


def _rule_filter(bootstrap: Bootstrap) -> None:
    """An RBAC filter that enforces nothing; its shadow rule records which rule matched (as sidecarless's)."""
    rules = {"action": "ALLOW", "policies": {"rule-0": {"permissions": [GET_ONLY], "principals": [{"any": True}]}}}
    config = {"@type": RBAC_TYPE, "shadow_rules": rules, "shadow_rules_stat_prefix": "ingress_"}
    filters = _manager(bootstrap)["http_filters"]
    filters.insert(len(filters) - 1, {"name": "sidecarless.rule_ingress", "typed_config": config})


def _hit_counters(bootstrap: Bootstrap) -> None:
    matched_rule = "%DYNAMIC_METADATA(envoy.filters.http.rbac:ingress_shadow_effective_policy_id)%"
    tags = [
        {"name": "chain", "value_format": "bench_server"},
        {"name": "ingress", "value_format": matched_rule},
        {"name": "details", "value_format": "%RESPONSE_CODE_DETAILS%"},
    ]
    config = {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config",
        "stat_prefix": "sidecarless",
        "counters": [{"stat": {"name": "hits", "tags": tags}, "value_fixed": 1}],
    }
    _manager(bootstrap).setdefault("access_log", []).append(
        {"name": "envoy.access_loggers.stats", "typed_config": config}
    )


def _access_log_service(bootstrap: Bootstrap) -> None:
    """Denials and errors to a gRPC collector (none answers: the bench's requests are all 200, never logged)."""
    minimum = {"default_value": 400, "runtime_key": "bench.min_status"}
    status_400_or_more = {"status_code_filter": {"comparison": {"op": "GE", "value": minimum}}}
    none_sampled = {"numerator": 0, "denominator": "HUNDRED"}
    sampled = {"runtime_filter": {"runtime_key": "bench.forwarded", "percent_sampled": none_sampled}}
    config = {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {
            "log_name": "bench",
            "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
            "transport_api_version": "V3",
            "buffer_flush_interval": "0.010s",
        },
    }
    log = {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"or_filter": {"filters": [status_400_or_more, sampled]}},
        "typed_config": config,
    }
    _manager(bootstrap).setdefault("access_log", []).append(log)
    http2 = {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
             "explicit_http_config": {"http2_protocol_options": {}}}  # fmt: skip
    endpoint = {"endpoint": {"address": {"pipe": {"path": "/run/sidecarless-bench-no-collector.sock"}}}}
    bootstrap["static_resources"]["clusters"].append({
        "name": ALS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2},
        "load_assignment": {"cluster_name": ALS_CLUSTER, "endpoints": [{"lb_endpoints": [endpoint]}]},
    })  # fmt: skip


ADOPTED = (_no_request_id, _no_envoy_headers, _server_header_passed, _no_dynamic_stats)
SIDECARLESS_ADDS = (_path_normalization, _rule_filter, _hit_counters, _access_log_service)
DEFAULT = "default"
# Name -> what it changes; `default` first: the reference of every other row.
OPTIONS: dict[str, tuple[Callable[[Bootstrap], None], ...]] = {
    DEFAULT: (),
    "generate_request_id: false": (_no_request_id,),
    "router suppress_envoy_headers": (_no_envoy_headers,),
    "server_header_transformation: PASS_THROUGH": (_server_header_passed,),
    "router dynamic_stats: false": (_no_dynamic_stats,),
    "per_connection_buffer_limit_bytes: 32 KiB": (_small_buffers,),
    "every statistic rejected": (_no_stats,),
    "adopted (all four above the buffers)": ADOPTED,
    "sidecarless: path normalization": (_path_normalization,),
    "sidecarless: rule filter (RBAC shadow rules)": (_rule_filter,),
    "sidecarless: hit counters (stats access log)": (_hit_counters,),
    "sidecarless: access log service (>= 400)": (_access_log_service,),
    "sidecarless: the four, with the adopted": (*ADOPTED, *SIDECARLESS_ADDS),
}


def option_bootstrap(bare: Bootstrap, option: str) -> Bootstrap:
    """The bare node Envoy's configuration with `option` applied."""
    changed = copy.deepcopy(bare)
    for apply in OPTIONS[option]:
        apply(changed)
    return changed


def summarize_options(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median per (connection, option), and each option's rate, p99 and Envoy CPU per request as ratios of the
    default's in the same run."""
    connections = sorted({s["connection"] for s in samples})
    result = medians_by(samples, connections, "option", OPTIONS)
    for connection in connections:
        default = result.get(f"{connection} {DEFAULT}")
        for option in OPTIONS:
            row = result.get(f"{connection} {option}")
            if default and row and option != DEFAULT:
                row["rps_vs_default"] = round(row["rps"] / default["rps"], 3)
                row["p99_vs_default"] = round(row["p99_ms"] / default["p99_ms"], 3)
                row["cpu_vs_default"] = round(row["proxy_cpu_us_per_request"] / default["proxy_cpu_us_per_request"], 3)
    return result
