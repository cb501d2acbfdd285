"""Cilium's own connectivity suite, its pod-to-pod HTTP scenarios, in one lab (they share one pod file; each
scenario's policies applied to the running lab in turn; `lab test` runs each in a fresh lab).

tests/conformance/ is a copy of the project's shared conformance folder (../shared/conformance), kept in the
repository so that CI's clean clone has it.
"""

from pathlib import Path

import pytest

from sidecarless.lab.scenario import Outcome, run_scenarios_in_one_lab
from tests.e2e.conftest import assert_ran_in_both_families, lab_name

SUITE = Path(__file__).resolve().parents[1] / "conformance" / "cilium-connectivity"
# Needs Kubernetes ClusterNetworkPolicy, which is out of scope (../shared/conformance/README.md).
OUT_OF_SCOPE = {"echo-ingress-from-client-tiered-wildcard-pass-l7"}
SCENARIOS = (
    sorted(p.name for p in SUITE.iterdir() if p.is_dir() and p.name not in OUT_OF_SCOPE) if SUITE.is_dir() else []
)


def test_the_suite_is_there() -> None:
    assert len(SCENARIOS) == 12, f"expected the 12 in-scope scenarios under {SUITE}"


@pytest.fixture(scope="module")
def suite() -> tuple[dict[Path, list[Outcome]], list[str]]:
    """The scenarios share one pod file: one lab, each scenario's policies applied to it in turn."""
    lines: list[str] = []
    return run_scenarios_in_one_lab([SUITE / s for s in SCENARIOS], lab_name("conf"), lines.append), lines


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cilium_connectivity_scenario(scenario: str, suite: tuple[dict[Path, list[Outcome]], list[str]]) -> None:
    results, lines = suite
    outcomes = results[SUITE / scenario]
    assert outcomes and all(outcome.passed for outcome in outcomes), "\n".join(lines)
    assert_ran_in_both_families(outcomes)
