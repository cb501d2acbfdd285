"""Every verdict table, through `policy trace` (the e2e tier runs the same tables through the lab)."""

import shutil
from pathlib import Path

import pytest
import yaml

from sidecarless.lab.pods import parse_pods
from sidecarless.lab.scenario import run_offline

TESTS = Path(__file__).resolve().parents[1]
TABLES = [
    TESTS.parent / "examples" / "billing-api",
    TESTS.parent / "examples" / "two-nodes",
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


@pytest.mark.parametrize("table", TABLES, ids=[p.name for p in TABLES])
def test_every_table_gives_the_same_verdicts_over_ipv6(table: Path, tmp_path: Path) -> None:
    """The same table with dual-stack pods, every case between pods run over IPv6: the verdicts the table
    expects for IPv4, unchanged (the policy engine is family-independent). Cases with an external host keep
    its IPv4 address and are left out here."""
    copy = tmp_path / table.name
    shutil.copytree(table, copy)
    pods_text = (table / "pods.yaml").read_text()
    (copy / "pods.yaml").write_text("ipFamily: dual\n" + pods_text)
    externals = {pod.name for pod in parse_pods("pods.yaml", pods_text) if pod.external_ip is not None}
    document = yaml.safe_load((table / "cases.yaml").read_text())
    cases = [case for case in document["cases"] if not {case["from"], case["to"]} & externals]
    document["cases"] = [{**case, "family": 6} for case in cases]
    (copy / "cases.yaml").write_text(yaml.safe_dump(document))
    outcomes = run_offline(copy)
    assert len(outcomes) == len(cases)
    failed = [outcome.line() for outcome in outcomes if not outcome.passed]
    assert not failed, "\n".join(failed)
