"""Reproducible installs (issue 18): the virtual environment holds exactly what requirements-lock.txt pins, the
lock satisfies pyproject.toml, and every installer (make setup, CI through it, the Dockerfile) installs with it."""

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements-lock.txt"
# The environment's own tools and the project itself, which no lock pins.
NOT_LOCKED = {"pip", "setuptools", "sidecarless"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        text = line.partition("#")[0].strip()
        if text:
            name, _, version = text.partition("==")
            assert version, f"requirements-lock.txt: {line!r} is not NAME==VERSION"
            pins[canonical(name)] = version
    return pins


def test_the_environment_holds_exactly_what_the_lock_pins() -> None:
    assert sys.prefix != sys.base_prefix, "run in the project's virtual environment"
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed = {name: version for name, version in installed.items() if name not in NOT_LOCKED}
    pins = locked()
    assert {n: v for n, v in installed.items() if pins.get(n) != v} == {}, "installed otherwise than locked"
    assert sorted(set(pins) - set(installed)) == [], "locked but not installed"


def test_the_lock_satisfies_pyproject_and_every_installer_uses_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    extras = project["optional-dependencies"]
    assert {"lab", "bench", "dev"} <= set(extras)
    for text in [*project["dependencies"], *(r for group in extras.values() for r in group)]:
        requirement = Requirement(text)
        name = canonical(requirement.name)
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), (text, pins.get(name))
    # The image carries neither the lab's HTTP server nor the benchmark's charts.
    assert not any(canonical(Requirement(r).name) in ("hypercorn", "matplotlib") for r in project["dependencies"])
    assert "-c requirements-lock.txt -e '.[dev,lab,bench]'" in (ROOT / "scripts" / "setup.sh").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The dependencies from the lock, then the project alone.
    assert "-c requirements-lock.txt -r /tmp/dependencies.txt" in dockerfile
    assert "--no-deps -c requirements-lock.txt ." in dockerfile
