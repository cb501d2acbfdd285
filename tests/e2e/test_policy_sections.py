"""Each section of POLICY.md as a verdict table (tests/scenarios/), through the real kernel and Envoy."""

from pathlib import Path

import pytest

from sidecarless.lab.scenario import run_scenario
from tests.e2e.conftest import assert_ran_in_both_families, lab_name

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
SECTIONS = sorted(p.name for p in SCENARIOS.iterdir() if p.is_dir())


@pytest.mark.parametrize("section", SECTIONS)
def test_policy_section(section: str) -> None:
    lines: list[str] = []
    outcomes = run_scenario(SCENARIOS / section, lab_name("section"), report=lines.append)
    assert outcomes and all(outcome.passed for outcome in outcomes), "\n".join(lines)
    assert_ran_in_both_families(outcomes)
