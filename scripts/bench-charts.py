"""Charts for docs/benchmarks.md from the newest results in bench/results/ (or the files given):
requests/s and p99 per mode (keep-alive and Connection: close), and idle proxy memory against pods.

    .venv/bin/python scripts/bench-charts.py [datapath-*.json]
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
MODES = ("baseline", "sidecar", "sidecarless-l4", "sidecarless-l7", "node-envoy-bare")


def newest(kind: str) -> Path:
    found = sorted(p for p in RESULTS.glob(f"{kind}-2*.json"))
    if not found:
        raise SystemExit(f"no {kind} results in {RESULTS}: run `make bench` first")
    return found[-1]


def bars(result: dict[str, Any], figure_name: str, key: str, label: str) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (section, title) in zip(
        axes, (("modes", "keep-alive"), ("modes_close", "Connection: close")), strict=True
    ):
        modes = [m for m in MODES if m in result[section]]
        values = [result[section][m][key] for m in modes]
        axis.bar(modes, values, color=["#888", "#c44", "#4a4", "#2a7", "#46c"][: len(modes)])
        axis.set_title(title)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", rotation=25)
        for index, value in enumerate(values):
            axis.annotate(f"{value:,.0f}" if value >= 100 else f"{value:.2f}", (index, value), ha="center", va="bottom")
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


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else newest("datapath")
    result = json.loads(path.read_text())
    written = [
        bars(result, "bench-rps.png", "rps", "requests/s"),
        bars(result, "bench-p99.png", "p99_ms", "p99 latency (ms)"),
        memory(result),
    ]
    for chart in written:
        print(f"wrote {chart.relative_to(REPO)} from {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
