"""The churn benchmark in its smoke mode (3 rounds): an address reused across two nodes moves to its new identity
in both nodes' kernel ipcache, and the result has the documented shape. A benchmark, not a test of speed:
`make bench` runs the full one (100 rounds)."""

import json
from pathlib import Path

from sidecarless.bench.churn import run


def test_churn_benchmark_smoke(tmp_path: Path) -> None:
    result = run(smoke=True, results_dir=tmp_path, report=lambda line: None)
    written = json.loads(Path(result["file"]).read_text())
    assert written["kind"] == "churn" and written["smoke"] is True
    summary = written["summary"]
    assert summary["rounds"] == 3 and len(written["samples_ms"]) == 3
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
