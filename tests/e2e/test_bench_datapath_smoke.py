"""The datapath benchmark in its smoke mode (1-second runs, 3 pods): every mode runs through the path it claims
(each run checks that POST is denied by RBAC exactly where a proxy applies the rule), and the result has the
documented shape. A benchmark, not a test of speed: `make bench` runs the full one."""

import json
import signal
from pathlib import Path

from sidecarless.bench.datapath import MODES, PROXIED, run
from sidecarless.bench.envoy_options import DEFAULT, OPTIONS


def test_datapath_benchmark_smoke(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    result = run(smoke=True, results_dir=tmp_path, report=lambda line: None)
    # Processes started later would inherit an ignored SIGTERM and then ignore being stopped.
    assert signal.getsignal(signal.SIGTERM) is handler
    written = json.loads(Path(result["file"]).read_text())
    assert written["kind"] == "datapath" and written["smoke"] is True
    assert set(written["modes"]) == set(MODES)
    # IPv6 rows, judged against the same references as IPv4 (issue 14)
    assert {"sidecarless-l4-ipv6", "sidecarless-l7-ipv6", "baseline-ipv6"} <= set(MODES)
    assert "rps_vs_baseline-ipv6" in written["modes"]["sidecarless-l4-ipv6"]
    assert "rps_vs_node-envoy-bare" in written["modes"]["sidecarless-l7-ipv6"]
    # Cross-node rows, client and server on different nodes (issue 15)
    assert {"baseline-cross", "sidecar-cross", "sidecarless-l4-cross", "sidecarless-l7-cross"} <= set(MODES)
    assert "rps_vs_baseline-cross" in written["modes"]["sidecarless-l4-cross"]
    assert "rps_vs_sidecar-cross" in written["modes"]["sidecarless-l7-cross"]
    for mode, figures in written["modes"].items():
        assert figures["rps"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"], mode
        assert (figures["proxy_cpu_us_per_request"] > 0) == (mode in PROXIED), mode
    # Socket acceleration on and off in one run (each run checks the sockets were paired exactly when it is on).
    for layer in ("l4", "l7"):
        assert written["modes"][f"sidecarless-{layer}-sockmap"]["rps_vs_without_sockmap"] > 0, layer
    (memory,) = written["memory"]
    assert memory["pods"] == 3
    for key in ("sidecarless_proxy_rss_mib", "sidecar_proxy_rss_mib", "sidecarless_proxy_private_mib",
                "sidecar_proxy_private_mib"):  # fmt: skip
        assert memory[key] > 0, key
    # Three sidecar Envoys hold more than one node Envoy, measured.
    assert memory["sidecar_proxy_rss_mib"] > memory["sidecarless_proxy_rss_mib"]
    # Issue 19: the agent's memory, its start (compiling) and its restart (the programs pinned) to ready.
    assert memory["sidecarless_agent_rss_mib"] > 0 and memory["agent_restart_ready_s"] > 0
    # A restart opens the pinned programs; the first start compiled them (seconds).
    assert memory["agent_restart_ready_s"] < memory["agent_first_ready_s"], memory
    # The L7 path with the node's Envoy at 1 and 2 workers, each switch a handover.
    assert {sample["workers"] for sample in written["worker_samples"]} == {1, 2}
    assert written["workers"]["keep-alive 2"]["rps_vs_1_worker"] > 0
    # Envoy's defaults one at a time: the bare Envoy with each option, against the default in the same run.
    assert {sample["option"] for sample in written["envoy_option_samples"]} == set(OPTIONS)
    for option in OPTIONS:
        if option != DEFAULT:
            assert written["envoy_options"][f"keep-alive {option}"]["cpu_vs_default"] > 0, option
