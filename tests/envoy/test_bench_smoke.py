"""The control-plane benchmark in its smoke mode: it runs and writes a result with the documented shape.
(Benchmarks measure; this only checks the benchmark works. `make bench` runs the full one.)"""

import json
import signal
from pathlib import Path

from sidecarless.bench.control_plane import run


def test_control_plane_benchmark_smoke(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    result = run(smoke=True, results_dir=tmp_path)
    # Processes started later would inherit an ignored SIGTERM and then ignore being stopped.
    assert signal.getsignal(signal.SIGTERM) is handler
    written = json.loads(Path(str(result["file"])).read_text())
    assert written["kind"] == "control-plane" and written["smoke"] is True
    (measured,) = written["runs"]
    for key in ("rules", "endpoints", "compile_ms", "render_ms", "send_to_ack_ms", "change_to_enforced_p50_ms",
                "change_to_enforced_p99_ms", "agent_rss_mib", "envoy_rss_mib"):  # fmt: skip
        assert measured[key] > 0, key
    assert len(measured["change_samples_ms"]) == 5
    (prefixes,) = written["prefix_runs"]
    assert prefixes["prefixes"] == 1000 and len(prefixes["apply_samples_ms"]) == 2
    for key in ("compile_ms", "render_ms", "apply_to_enforced_p50_ms", "apply_compile_p50_ms"):
        assert prefixes[key] > 0, key
    # Issue 19's scale case, small: most policies L3/L4, one in ten with HTTP rules, the fake API server in a child.
    scale = written["scale"]
    assert (scale["policies"], scale["endpoints"], scale["local_endpoints"], scale["rules"]) == (200, 1000, 20, 40)
    assert len(scale["change_samples_ms"]) == 5 and scale["agent_rss_mib"] > 0 and scale["compile_ms"] > 0
