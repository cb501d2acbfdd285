"""What every benchmark writes: one JSON file per run in bench/results/, with the machine, the versions and
the raw samples; and how a benchmark stops on a timeout's SIGTERM."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_result(
    kind: str, smoke: bool, versions: dict[str, str], body: dict[str, Any], results_dir: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "kind": kind,
        "smoke": smoke,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "versions": versions,
        **body,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{kind}-{'smoke-' if smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["file"] = str(path)
    return result


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, private) in MiB: RSS counts shared pages in every process that maps them; private does not."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values["Rss"] / 1024, (values["Private_Clean"] + values["Private_Dirty"]) / 1024


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While a benchmark runs, a timeout's SIGTERM unwinds like Ctrl-C, through the finally blocks that stop the
    Envoys, labs and servers it started. The caller's handler is back afterwards."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_ignored() -> Iterator[None]:
    """Around a benchmark's cleanup: a second signal must not leave labs and Envoys behind. Only around it:
    a process started while SIGTERM is ignored inherits that, and then ignores `stop` too (the suite's later
    labs did, each stop waiting out its timeout)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def medians_by(
    samples: list[dict[str, Any]], connections: Iterable[str], field: str, values: Iterable[object]
) -> dict[str, dict[str, float]]:
    """Over the rounds, the median rate, p99 and proxy CPU per request of each connection kind and value of
    `field` (workers, an Envoy option), keyed "<connection> <value>"."""
    result: dict[str, dict[str, float]] = {}
    for connection in connections:
        for value in values:
            mine = [s for s in samples if s["connection"] == connection and s[field] == value]
            if mine:
                result[f"{connection} {value}"] = {
                    key: round(statistics.median(s[key] for s in mine), 4)
                    for key in ("rps", "p99_ms", "proxy_cpu_us_per_request")
                }
    return result
