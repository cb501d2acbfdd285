"""The layering contracts (pyproject [tool.importlinter], run by `make lint`) fail when a forbidden import is
added: each case adds one import to a copy of the package and expects the named contract to break."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(tmp_path: Path, module: str = "", line: str = "") -> subprocess.CompletedProcess[str]:
    shutil.copytree(ROOT / "src" / "sidecarless", tmp_path / "src" / "sidecarless", symlinks=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if module:
        path = tmp_path / "src" / "sidecarless" / module
        path.write_text(path.read_text() + f"\n{line}\n")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_every_contract(tmp_path: Path) -> None:
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("policy/model.py", "import grpc", "The policy engine is pure"),
        ("policy/model.py", "import sidecarless.policy.compile", "Inside policy"),
        ("api/server.py", "import sidecarless.agent.agent", "Layers"),
        ("xds/render.py", "import sidecarless.redirect.maps", "Layers"),
        ("xds/snapshot.py", "import sidecarless.xds.server", "Rendering is pure"),
        ("agent/enforce.py", "import sidecarless.redirect.netlink", "The ACK gate is pure"),
        ("agent/node.py", "import sidecarless.lab.pods", "never imports the lab"),
        ("agent/config.py", "import sidecarless.agent.agent", "No import cycles"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    result = lint(tmp_path, module, line)
    assert result.returncode != 0
    broken_lines = [text for text in result.stdout.splitlines() if "BROKEN" in text]
    report = result.stdout.replace("\n", " ")
    assert broken_lines, result.stdout
    assert broken in report.split("Broken contracts")[-1] or any(broken in text for text in broken_lines), report


def test_each_room_is_small_enough_to_read() -> None:
    """The agent's wiring under 300 lines, no policy module over about 400, no loose module at the root."""
    package = ROOT / "src" / "sidecarless"
    assert len((package / "agent" / "agent.py").read_text().splitlines()) < 300
    for module in (package / "policy").glob("*.py"):
        assert len(module.read_text().splitlines()) <= 400, module.name
    assert sorted(path.name for path in package.glob("*.py")) == ["__init__.py", "__main__.py"]
