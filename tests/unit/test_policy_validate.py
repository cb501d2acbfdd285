"""`sidecarless policy validate`: every error of every file, as file:line: field: message."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import EXAMPLES

GOOD = (EXAMPLES / "billing-api" / "policies" / "billing-api.yaml").read_text()

# (file name, the broken text, the line the error must name)
BROKEN = [
    (
        "01-typo.yaml",
        GOOD.replace(
            '    toPorts:\n    - ports: [{port: "8080", protocol: TCP}]\n      rules: {http: [{method: GET',
            '    toPort:\n    - ports: [{port: "8080", protocol: TCP}]\n      rules: {http: [{method: GET',
        ),
        8,
    ),
    ("02-regex.yaml", GOOD.replace("path: /metrics", "path: '/(a)\\1'"), 10),
    (
        "03-port.yaml",
        GOOD.replace(
            'port: "8080", protocol: TCP}]\n      rules: {http: [{method: POST',
            'port: "99999", protocol: TCP}]\n      rules: {http: [{method: POST',
        ),
        13,
    ),
    (
        "04-protocol.yaml",
        GOOD.replace(
            "protocol: TCP}]\n      rules: {http: [{method: GET",
            "protocol: QUIC}]\n      rules: {http: [{method: GET",
        ),
        9,
    ),
    ("05-yaml.yaml", GOOD.replace("  ingress:\n", "  ingress:\n  - [\n"), 8),
    ("06-kind.yaml", GOOD.replace("kind: CiliumNetworkPolicy", "kind: NetworkPolicy"), 2),
    (
        "07-selector.yaml",
        GOOD.replace(
            "endpointSelector: {matchLabels: {app: billing-api}}",
            "endpointSelector: {matchLabels: {app: [billing-api]}}",
        ),
        5,
    ),
    (
        "08-cidr.yaml",
        GOOD.replace("  - fromEndpoints: [{matchLabels: {app: finance-batch}}]", "  - fromCIDR: [10.0.0.0/40]"),
        11,
    ),
    ("09-utf8.yaml", None, 3),
    ("10-missing.yaml", GOOD.replace("  endpointSelector: {matchLabels: {app: billing-api}}\n", ""), 5),
]


def write_broken_files(directory: Path) -> list[tuple[str, int]]:
    for name, text, _ in BROKEN:
        if text is None:
            (directory / name).write_bytes(GOOD.encode().replace(b"billing-api-l7-policy", b"billing-\xff", 1))
        else:
            assert text != GOOD, name
            (directory / name).write_text(text)
    return [(name, line) for name, _, line in BROKEN]


def test_validate_reports_every_broken_file_with_its_line(tmp_path: Path) -> None:
    expected = write_broken_files(tmp_path)
    (tmp_path / "good.yaml").write_text(GOOD)
    result = subprocess.run([sys.executable, "-m", "sidecarless", "policy", "validate", str(tmp_path)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{tmp_path}/{name}:{line}" for name, line in expected], (
        result.stdout
    )
    assert "spec.ingress[0].toPort: unknown field" in lines[0]
    assert "file is not UTF-8" in lines[8]
    assert lines[1].endswith('invalid regular expression "/(a)\\1": invalid escape sequence: \\1')


def test_validate_accepts_good_files_and_reports_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    ok = subprocess.run([sys.executable, "-m", "sidecarless", "policy", "validate", str(tmp_path / "good.yaml")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and "valid" in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "sidecarless", "policy", "validate", str(tmp_path / "nope")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 1 and "no such file or directory" in missing.stdout


def test_policy_trace_names_verdict_path_and_rules() -> None:
    billing = EXAMPLES / "billing-api"
    base = [sys.executable, "-m", "sidecarless", "policy", "trace", "--pods", str(billing / "pods.yaml")]
    denied = subprocess.run(
        [*base, "--policies", str(billing / "policies"), "--from", "prometheus", "--to", "billing-api",
         "--port", "8080", "--method", "POST", "--path", "/metrics"], capture_output=True, text=True,
    )  # fmt: skip
    assert denied.returncode == 0, denied.stderr
    lines = denied.stdout.splitlines()
    assert lines[0] == "verdict: denied (HTTP 403) through the proxy (ingress)"
    assert any("production/billing-api-l7-policy spec.ingress[0]" in line for line in lines)
    kernel = subprocess.run(
        [*base, "--policies", str(billing / "policies-with-5432"), "--from", "finance-batch", "--to",
         "billing-api", "--port", "5432", "--proto", "tcp", "-o", "json"], capture_output=True, text=True,
    )  # fmt: skip
    import json

    result = json.loads(kernel.stdout)
    assert (result["verdict"], result["proxied"]) == ("allowed", [])
    dropped = subprocess.run(
        [*base, "--policies", str(billing / "policies"), "--from", "dev-tool", "--to", "billing-api",
         "--port", "8080"], capture_output=True, text=True,
    )  # fmt: skip
    assert dropped.stdout.splitlines()[0] == "verdict: dropped: Policy denied"


def test_policy_trace_shows_the_audit_verdict_beside_the_enforced_one(tmp_path: Path) -> None:
    """An audited policy that would open billing-api's 8080 to dev-tool: enforced, dropped; audit, allowed."""
    billing = EXAMPLES / "billing-api"
    for source in (billing / "policies").glob("*.yaml"):
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "audited.yaml").write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "metadata: {name: open, namespace: production, annotations: {policy.sidecarless.io/audit: 'true'}}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: billing-api}}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {app: dev-tool}}]}]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecarless", "policy", "trace", "--pods", str(billing / "pods.yaml"),
         "--policies", str(tmp_path), "--from", "dev-tool", "--to", "billing-api", "--port", "8080"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "verdict: dropped: Policy denied"
    audit = next(line for line in lines if line.startswith("audit "))
    assert "allowed in the kernel" in audit and audit.endswith("would change it")
    assert any("production/open spec.ingress[0]" in line for line in lines)
