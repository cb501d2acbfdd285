"""Every verdict table, through `policy trace` (the e2e tier runs the same tables through the lab)."""

from pathlib import Path

import pytest

from sidecarless.lab.scenario import run_offline

TESTS = Path(__file__).resolve().parents[1]
TABLES = [
    TESTS.parent / "examples" / "billing-api",
    *sorted(p for p in (TESTS / "scenarios").iterdir() if p.is_dir()),
    *sorted(
        p
        for p in (TESTS / "conformance" / "cilium-connectivity").iterdir()
        if p.is_dir() and p.name != "echo-ingress-from-client-tiered-wildcard-pass-l7"
    ),
]


@pytest.mark.parametrize("table", TABLES, ids=[p.name for p in TABLES])
def test_trace_agrees_with_the_table(table: Path) -> None:
    outcomes = run_offline(table)
    failed = [outcome.line() for outcome in outcomes if not outcome.passed]
    assert outcomes and not failed, "\n".join(failed)
