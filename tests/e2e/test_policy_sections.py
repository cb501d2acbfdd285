"""Each section of POLICY.md as a verdict table (tests/scenarios/), through the real kernel and Envoy.

The sections share one pod file: they run one after another in one lab, each one's policies applied to the
running lab (a lab's start costs more than most tables), every case over IPv4 and over IPv6.
"""

from pathlib import Path

import pytest

from sidecarless.lab.scenario import Outcome, run_scenarios_in_one_lab
from tests.e2e.conftest import assert_ran_in_both_families, lab_name

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
SECTIONS = sorted(p.name for p in SCENARIOS.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def sections() -> tuple[dict[Path, list[Outcome]], list[str]]:
    lines: list[str] = []
    return run_scenarios_in_one_lab([SCENARIOS / s for s in SECTIONS], lab_name("section"), lines.append), lines


@pytest.mark.parametrize("section", SECTIONS)
def test_policy_section(section: str, sections: tuple[dict[Path, list[Outcome]], list[str]]) -> None:
    results, lines = sections
    outcomes = results[SCENARIOS / section]
    assert outcomes and all(outcome.passed for outcome in outcomes), "\n".join(lines)
    assert_ran_in_both_families(outcomes)
