"""docs/benchmarks.md's tables and charts from the newest results in bench/results/: requests/s and p99 per
mode (keep-alive and Connection: close), idle proxy memory against pods, and the control-plane grid. The
tables go between the `<!-- table:NAME -->` and `<!-- end -->` markers of docs/benchmarks.md.

    .venv/bin/python scripts/bench-report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parent.parent
RESULTS, DOCS = REPO / "bench" / "results", REPO / "docs"
MODES = ("baseline", "sidecar", "sidecarless-l4", "sidecarless-l7", "node-envoy-bare", "sidecarless-l4-sockmap",
         "sidecarless-l7-sockmap", "baseline-ipv6", "sidecarless-l4-ipv6", "sidecarless-l7-ipv6", "baseline-cross",
         "sidecar-cross", "sidecarless-l4-cross", "sidecarless-l7-cross")  # fmt: skip


def newest(kind: str) -> Path:
    found = sorted(p for p in RESULTS.glob(f"{kind}-2*.json"))
    if not found:
        raise SystemExit(f"no {kind} results in {RESULTS}: run `make bench` first")
    return found[-1]


def bars(result: dict[str, Any], figure_name: str, key: str, label: str) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(16, 5))
    for axis, (section, title) in zip(
        axes, (("modes", "keep-alive"), ("modes_close", "Connection: close")), strict=True
    ):
        modes = [m for m in MODES if m in result[section]]
        values = [result[section][m][key] for m in modes]
        colors = ["#888", "#c44", "#4a4", "#2a7", "#46c", "#8d4", "#3b8", "#aaa", "#6c6", "#4c9", "#666", "#a22",
                  "#282", "#185"]  # fmt: skip
        axis.bar(modes, values, color=colors[: len(modes)])
        axis.set_title(title)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", rotation=40)
        plt.setp(axis.get_xticklabels(), ha="right")
        for index, value in enumerate(values):
            text = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
            axis.annotate(text, (index, value), ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    path = DOCS / figure_name
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def memory(result: dict[str, Any]) -> Path:
    runs = result["memory"]
    pods = [r["pods"] for r in runs]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(pods, [r["sidecar_proxy_rss_mib"] for r in runs], "o-", color="#c44", label="sidecar: N Envoys, RSS")
    axis.plot(pods, [r["sidecar_proxy_private_mib"] for r in runs], "o--", color="#c44", label="sidecar: private")
    axis.plot(
        pods, [r["sidecarless_proxy_rss_mib"] for r in runs], "o-", color="#2a7", label="sidecarless: 1 Envoy, RSS"
    )
    axis.plot(
        pods, [r["sidecarless_proxy_private_mib"] for r in runs], "o--", color="#2a7", label="sidecarless: private"
    )
    axis.set_xlabel("pods on the node")
    axis.set_ylabel("idle proxy memory (MiB)")
    axis.set_yscale("log")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = DOCS / "bench-memory.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


MODE_COLUMNS = [
    ("mode", "mode"), ("rps", "req/s"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
    ("proxy_cpu_us_per_request", "proxy CPU us/req"), ("proxy_cpu_s_per_10k_requests", "proxy CPU s/10k req"),
    ("agent_cpu_us_per_request", "agent CPU us/req"), ("proxy_rss_mib", "proxy RSS MiB"),
    ("rps_vs_baseline", "req/s vs baseline"), ("rps_vs_sidecar", "req/s vs sidecar"),
    ("rps_vs_node-envoy-bare", "req/s vs bare"), ("p99_vs_baseline", "p99 vs baseline"),
    ("p99_vs_sidecar", "p99 vs sidecar"),
]  # fmt: skip
MEMORY_COLUMNS = [
    ("pods", "pods"), ("sidecarless_proxy_rss_mib", "sidecarless Envoy RSS"),
    ("sidecarless_proxy_private_mib", "private"), ("sidecarless_per_pod_rss_mib", "per pod"),
    ("sidecar_proxy_rss_mib", "N sidecars RSS"), ("sidecar_proxy_private_mib", "private"),
    ("sidecar_per_pod_rss_mib", "per pod"), ("sidecarless_agent_rss_mib", "agent RSS"),
    ("agent_first_ready_s", "agent start->ready s (compiles)"), ("agent_restart_ready_s", "restart->ready s (cached)"),
    ("agent_restart_to_ready_s", "SIGTERM->ready s"),
]  # fmt: skip
WORKER_COLUMNS = [
    ("case", "connection, workers"), ("rps", "req/s"), ("p99_ms", "p99 ms"),
    ("proxy_cpu_us_per_request", "proxy us/req"),
    ("rps_vs_1_worker", "req/s vs 1 worker"), ("p99_vs_1_worker", "p99 vs 1 worker"),
]  # fmt: skip
OPTION_COLUMNS = [
    ("case", "connection, option"), ("rps", "req/s"), ("p99_ms", "p99 ms"),
    ("proxy_cpu_us_per_request", "Envoy us/req"), ("rps_vs_default", "req/s vs default"),
    ("p99_vs_default", "p99 vs default"), ("cpu_vs_default", "Envoy CPU/req vs default"),
]  # fmt: skip
CONTROL_COLUMNS = [
    ("rules", "rules"), ("endpoints", "endpoints"), ("local_endpoints", "on the node"), ("compile_ms", "compile ms"),
    ("render_ms", "render ms"), ("bytes", "bytes"), ("send_to_ack_ms", "send->ACK ms"),
    ("change_compile_p50_ms", "change: compile ms"), ("change_render_p50_ms", "render ms"),
    ("change_to_enforced_p50_ms", "change->enforced p50 ms"), ("change_to_enforced_p99_ms", "p99 ms"),
    ("agent_rss_mib", "agent RSS MiB"), ("envoy_rss_mib", "Envoy RSS MiB"),
]  # fmt: skip
PREFIX_COLUMNS = [
    ("prefixes", "prefixes"), ("endpoints", "endpoints"), ("compile_ms", "compile ms"), ("render_ms", "render ms"),
    ("apply_compile_p50_ms", "apply: compile ms"), ("apply_to_enforced_p50_ms", "apply->enforced p50 ms"),
    ("apply_to_enforced_max_ms", "max ms"),
]  # fmt: skip


def targets(datapath: dict[str, Any], control: dict[str, Any], churn: dict[str, Any] | None) -> str:
    """The issue's targets against this run, each with its verdict."""
    keep, close = datapath["modes"], datapath["modes_close"]
    l4, l7, bare = keep["sidecarless-l4"], keep["sidecarless-l7"], keep["node-envoy-bare"]
    memory = {run["pods"]: run for run in datapath["memory"]}
    runs = {(run["rules"], run["endpoints"]): run for run in control["runs"]}

    def per_pod(pods: int) -> tuple[float, float]:
        run = memory[pods]
        return run["sidecarless_proxy_rss_mib"] / pods, run["sidecarless_proxy_private_mib"] / pods

    def p99s(rules: int) -> list[float]:
        return [runs[(rules, e)]["change_to_enforced_p99_ms"] for e in (100, 1000, 10000)]

    big = runs[(5000, 10000)]
    prefixes = {run["prefixes"]: run for run in control["prefix_runs"]}[8000]
    rows = [
        ("sidecarless-l4 >= 0.98x baseline req/s, p99 <= 1.05x",
         f"{l4['rps_vs_baseline']:.3f}x, p99 {l4['p99_vs_baseline']:.2f}x (close: "
         f"{close['sidecarless-l4']['rps_vs_baseline']:.3f}x, {close['sidecarless-l4']['p99_vs_baseline']:.2f}x)",
         l4["rps_vs_baseline"] >= 0.98 and l4["p99_vs_baseline"] <= 1.05),
    ]  # fmt: skip
    if "sidecarless-l4-ipv6" in keep:  # results from before issue 14 have no IPv6 rows
        l4v6, l7v6 = keep["sidecarless-l4-ipv6"], keep["sidecarless-l7-ipv6"]
        rows += [
            ("IPv6: sidecarless-l4 >= 0.98x baseline (IPv6) req/s, p99 <= 1.05x",
             f"{l4v6['rps_vs_baseline-ipv6']:.3f}x, p99 {l4v6['p99_vs_baseline-ipv6']:.2f}x",
             l4v6["rps_vs_baseline-ipv6"] >= 0.98 and l4v6["p99_vs_baseline-ipv6"] <= 1.05),
            ("IPv6: sidecarless-l7 >= 0.9x node-envoy-bare (IPv4) req/s", f"{l7v6['rps_vs_node-envoy-bare']:.3f}x",
             l7v6["rps_vs_node-envoy-bare"] >= 0.9),
        ]  # fmt: skip
    if "sidecarless-l4-cross" in keep:  # results from before issue 15 have no cross-node rows
        l4x, l7x = keep["sidecarless-l4-cross"], keep["sidecarless-l7-cross"]
        rows += [
            ("across nodes: sidecarless-l4 >= 0.98x baseline (across nodes) req/s, p99 <= 1.05x",
             f"{l4x['rps_vs_baseline-cross']:.3f}x, p99 {l4x['p99_vs_baseline-cross']:.2f}x",
             l4x["rps_vs_baseline-cross"] >= 0.98 and l4x["p99_vs_baseline-cross"] <= 1.05),
            ("across nodes: sidecarless-l7 >= 2.0x sidecar (across nodes) req/s (keep-alive)",
             f"{l7x['rps_vs_sidecar-cross']:.2f}x", l7x["rps_vs_sidecar-cross"] >= 2.0),
            ("across nodes: sidecarless-l7 p99 <= 0.4x sidecar (across nodes)",
             f"{l7x['p99_vs_sidecar-cross']:.2f}x", l7x["p99_vs_sidecar-cross"] <= 0.4),
            ("across nodes: sidecarless-l7 >= 0.9x node-envoy-bare (one node) req/s",
             f"{l7x['rps_vs_node-envoy-bare']:.3f}x", l7x["rps_vs_node-envoy-bare"] >= 0.9),
        ]  # fmt: skip
    for connection, modes in (("keep-alive", keep), ("close", close)):  # issue 19
        mine, reference = modes["sidecarless-l7"], modes["node-envoy-bare"]
        versus_bare = (mine["rps_vs_node-envoy-bare"], mine["p99_ms"] / reference["p99_ms"])
        versus_sidecar = (mine["rps_vs_sidecar"], mine["p99_vs_sidecar"])
        rows += [
            (f"issue 19: sidecarless-l7 >= 1.3x node-envoy-bare req/s, p99 <= 0.8x ({connection})",
             "{:.2f}x, p99 {:.2f}x".format(*versus_bare), versus_bare[0] >= 1.3 and versus_bare[1] <= 0.8),
            (f"issue 19: sidecarless-l7 >= 2.5x sidecar req/s, p99 <= 0.35x ({connection})",
             "{:.2f}x, p99 {:.2f}x".format(*versus_sidecar), versus_sidecar[0] >= 2.5 and versus_sidecar[1] <= 0.35),
        ]  # fmt: skip
    if "sidecarless-l4-sockmap" in keep:  # issue 19: socket acceleration, kept if it gains >= 20% on L4 or L7
        for connection, modes in (("keep-alive", keep), ("close", close)):
            for layer in ("l4", "l7"):
                mine = modes[f"sidecarless-{layer}-sockmap"]
                rows.append((
                    f"issue 19: sockmap gains >= 20% on sidecarless-{layer} req/s ({connection})",
                    f"{mine['rps_vs_without_sockmap']:.3f}x, p99 {mine['p99_vs_without_sockmap']:.2f}x",
                    mine["rps_vs_without_sockmap"] >= 1.2,
                ))  # fmt: skip
        mine, reference = keep["sidecarless-l7-sockmap"], keep["node-envoy-bare"]
        rows.append((
            "issue 19: sidecarless-l7 with sockmap >= 1.3x node-envoy-bare req/s, p99 <= 0.8x (keep-alive)",
            f"{mine['rps_vs_node-envoy-bare']:.2f}x, p99 {mine['p99_ms'] / reference['p99_ms']:.2f}x",
            mine["rps_vs_node-envoy-bare"] >= 1.3 and mine["p99_ms"] / reference["p99_ms"] <= 0.8,
        ))  # fmt: skip
    rows += [
        ("sidecarless-l7 >= 2.0x sidecar req/s (keep-alive)", f"{l7['rps_vs_sidecar']:.2f}x",
         l7["rps_vs_sidecar"] >= 2.0),
        ("sidecarless-l7 p99 <= 0.4x sidecar (keep-alive)",
         f"{l7['p99_vs_sidecar']:.2f}x (node-envoy-bare: {bare['p99_vs_sidecar']:.2f}x)", l7["p99_vs_sidecar"] <= 0.4),
        ("sidecarless-l7 >= 0.9x node-envoy-bare req/s", f"{l7['rps_vs_node-envoy-bare']:.3f}x",
         l7["rps_vs_node-envoy-bare"] >= 0.9),
        ("proxy CPU per request, L7 path, <= 33 us (keep-alive)",
         f"{l7['proxy_cpu_us_per_request']:.1f} us (node-envoy-bare: {bare['proxy_cpu_us_per_request']:.1f} us)",
         l7["proxy_cpu_us_per_request"] <= 33),
        ("proxy memory per pod <= 1.5 MiB at N = 50", "{:.2f} MiB RSS, {:.2f} MiB private".format(*per_pod(50)),
         max(per_pod(50)) <= 1.5),
        ("proxy memory per pod <= 0.5 MiB at N = 200", "{:.2f} MiB RSS, {:.2f} MiB private".format(*per_pod(200)),
         max(per_pod(200)) <= 0.5),
    ]  # fmt: skip
    if "agent_restart_ready_s" in memory[50]:  # issue 19
        fifty = memory[50]
        rows += [
            ("agent RSS < 80 MiB at 50 pods", f"{fifty['sidecarless_agent_rss_mib']:.1f} MiB",
             fifty["sidecarless_agent_rss_mib"] < 80),
            ("agent restart -> ready < 1 s, programs cached (50 pods)",
             f"{fifty['agent_restart_ready_s']:.2f} s from its start ({fifty['agent_restart_to_ready_s']:.2f} s from "
             f"SIGTERM to the old one; first start, compiling: {fifty['agent_first_ready_s']:.2f} s)",
             fifty["agent_restart_ready_s"] < 1),
        ]  # fmt: skip
    rows += [
        ("change to enforced p99 <= 50 ms at 100 rules",
         "{:.1f} / {:.1f} / {:.1f} ms over 100 / 1,000 / 10,000 pods".format(*p99s(100)),
         all(v <= 50 for v in p99s(100))),
        ("change to enforced p99 <= 300 ms at 5,000 rules",
         "{:.0f} / {:.0f} / {:.0f} ms over 100 / 1,000 / 10,000 pods".format(*p99s(5000)),
         all(v <= 300 for v in p99s(5000))),
        ("compile + render of 5,000 rules over 10,000 pods <= 1 s",
         f"{big['compile_ms']:.0f} + {big['render_ms']:.0f} ms", big["compile_ms"] + big["render_ms"] <= 1000),
        ("8,000 /32 prefixes applied -> enforced < 1 s (issue 12)",
         f"{prefixes['apply_to_enforced_p50_ms']:.0f} ms (max {prefixes['apply_to_enforced_max_ms']:.0f} ms)",
         prefixes["apply_to_enforced_max_ms"] < 1000),
    ]  # fmt: skip
    big_p99 = big["change_to_enforced_p99_ms"]
    rows.append(("issue 19: change to enforced p99 < 50 ms at 5,000 rules over 10,000 pods", f"{big_p99:.0f} ms",
                 big_p99 < 50))  # fmt: skip
    if "scale" in control:  # issue 19
        scale = control["scale"]
        where = (f"{scale['policies']:,} policies over {scale['endpoints']:,} pods "
                 f"({scale['local_endpoints']:,} on the node)")  # fmt: skip
        rows += [
            (f"{where}: full compile < 5 s", f"{scale['compile_ms'] / 1000:.1f} s (render {scale['render_ms']:.0f} ms)",
             scale["compile_ms"] < 5000),
            (f"{where}: change to enforced p99 < 100 ms",
             f"{scale['change_to_enforced_p99_ms']:.0f} ms (p50 {scale['change_to_enforced_p50_ms']:.0f}; the change's "
             f"compile {scale['change_compile_p50_ms']:.0f}, render {scale['change_render_p50_ms']:.0f})",
             scale["change_to_enforced_p99_ms"] < 100),
            (f"{where}: agent RSS < 500 MiB", f"{scale['agent_rss_mib']:.0f} MiB", scale["agent_rss_mib"] < 500),
        ]  # fmt: skip
    if churn is not None:  # issue 15
        summary = churn["summary"]
        rows.append(
            ("address reused across nodes: API event -> every node's kernel ipcache, p99 <= 100 ms",
             f"p99 {summary['p99_ms']:.0f} ms (p50 {summary['p50_ms']:.0f}, max {summary['max_ms']:.0f}) over "
             f"{summary['rounds']} rounds", summary["p99_ms"] <= summary["target_p99_ms"])
        )  # fmt: skip
    lines = ["| target | this run | |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {'met' if met else 'missed'} |" for target, measured, met in rows]
    return "\n".join(lines)


def fill(document: str, name: str, table: str) -> str:
    start, end = f"<!-- table:{name} -->", "<!-- end -->"
    before, found, rest = document.partition(start)
    if not found:
        raise SystemExit(f"docs/benchmarks.md has no {start} marker")
    return before + start + "\n" + table + "\n" + end + rest.partition(end)[2]


def main() -> int:
    datapath_path, control_path = newest("datapath"), newest("control-plane")
    datapath, control = json.loads(datapath_path.read_text()), json.loads(control_path.read_text())
    churn_paths = sorted(RESULTS.glob("churn-2*.json"))
    churn = json.loads(churn_paths[-1].read_text()) if churn_paths else None
    for chart in (
        bars(datapath, "bench-rps.png", "rps", "requests/s"),
        bars(datapath, "bench-p99.png", "p99_ms", "p99 latency (ms)"),
        memory(datapath),
    ):
        print(f"wrote {chart.relative_to(REPO)}")
    doc_path = DOCS / "benchmarks.md"
    document = doc_path.read_text()
    for name, section in (("keep-alive", "modes"), ("close", "modes_close")):
        rows = [{"mode": mode, **figures} for mode, figures in datapath[section].items()]
        document = fill(document, name, markdown(rows, MODE_COLUMNS))
    document = fill(document, "memory", markdown(datapath["memory"], MEMORY_COLUMNS))
    if "workers" in datapath:  # issue 19
        rows = [{"case": case, **figures} for case, figures in datapath["workers"].items()]
        document = fill(document, "workers", markdown(rows, WORKER_COLUMNS))
    if "envoy_options" in datapath:  # issue 19
        rows = [{"case": case, **figures} for case, figures in datapath["envoy_options"].items()]
        document = fill(document, "envoy-options", markdown(rows, OPTION_COLUMNS))
    document = fill(document, "control-plane", markdown(control["runs"], CONTROL_COLUMNS))
    document = fill(document, "prefixes", markdown(control["prefix_runs"], PREFIX_COLUMNS))
    document = fill(document, "targets", targets(datapath, control, churn))
    sources = [datapath_path, control_path, *churn_paths[-1:]]
    document = fill(document, "sources", "Results: " + ", ".join(f"`{p.relative_to(REPO)}`" for p in sources) + ".")
    doc_path.write_text(document)
    print(f"wrote tables into {doc_path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
