"""`sidecarless bench`: the datapath and control-plane benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from sidecarless.cli.client import (
    Commands,
)


def _bench(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import table

    if args.bench_command == "datapath":
        from sidecarless.bench import datapath

        result = datapath.run(args.smoke, Path(args.results))
        columns = ["mode", "rps", "p50_ms", "p90_ms", "p99_ms", "proxy_cpu_us_per_request", "proxy_rss_mib",
                   "rps_vs_baseline", "rps_vs_sidecar", "rps_vs_node-envoy-bare", "p99_vs_sidecar"]  # fmt: skip
        for key, title in (("modes", "keep-alive"), ("modes_close", "Connection: close")):
            if result[key]:
                print(f"\n{title}")
                print(table([{"mode": mode, **figures} for mode, figures in result[key].items()], columns))
        print("\nidle proxy memory against pods")
        print(table(result["memory"], list(result["memory"][0])))
        print(f"results: {result['file']}")
        return 0
    if args.bench_command == "churn":
        from sidecarless.bench import churn

        result = churn.run(args.smoke, Path(args.results))
        print(table([result["summary"]], list(result["summary"])))
        print(f"results: {result['file']}")
        return 0
    from sidecarless.bench.control_plane import run
    from sidecarless.cli.progress import Progress

    progress = Progress()
    try:
        result = run(args.smoke, Path(args.results), progress)
    finally:
        progress.done()
    columns = ["rules", "endpoints", "local_endpoints", "compile_ms", "render_ms", "bytes", "send_to_ack_ms",
               "change_to_enforced_p50_ms", "change_to_enforced_p99_ms", "agent_rss_mib", "envoy_rss_mib"]  # fmt: skip
    print(table(result["runs"], columns))
    print(f"results: {result['file']}")
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    control_plane = bench_commands.add_parser("control-plane", help="compile, render and push at scale, real Envoy")
    control_plane.add_argument("--smoke", action="store_true", help="one small case: checks the benchmark works")
    control_plane.add_argument("--results", default="bench/results", help="where the JSON result goes")
    datapath = bench_commands.add_parser(
        "datapath", help="baseline, sidecar, sidecarless L4/L7 and a bare node Envoy, side by side in the lab"
    )
    datapath.add_argument("--smoke", action="store_true", help="1-second runs, 3 pods: checks the benchmark works")
    datapath.add_argument("--results", default="bench/results", help="where the JSON result goes")
    churn = bench_commands.add_parser(
        "churn", help="an address reused across two nodes: API event -> every node's kernel ipcache"
    )
    churn.add_argument("--smoke", action="store_true", help="3 rounds: checks the benchmark works")
    churn.add_argument("--results", default="bench/results", help="where the JSON result goes")
    bench.set_defaults(handler=_bench)
