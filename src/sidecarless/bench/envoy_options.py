"""Envoy's defaults on the L7 path, one at a time (issue 19): the benchmark's bare node Envoy, each option
changed alone, measured interleaved with the unchanged one. Pure: configurations and summaries.

A transparent policy proxy answers for nothing beyond its verdict: it has no use for a request ID of its own, for
`x-envoy-*` headers in requests and responses, for replacing the server's `server` header, or for per-request
statistics by upstream that nobody reads. What these cost is measured here; what sidecarless renders is the
`adopted` row (xds/render.py).
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


ADOPTED = (_no_request_id, _no_envoy_headers, _server_header_passed, _no_dynamic_stats)
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
