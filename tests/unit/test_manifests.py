"""manifests/ offline: every manifest against the Kubernetes OpenAPI schemas of a pinned version (strict: an
unknown field is an error), every sample against the CRDs' schemas and sidecarless's own validation, the CRDs
as scripts/generate-crds.py writes them, and kustomization.yaml naming every manifest."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from sidecarless.policy.schema import parse_policy_file
from sidecarless.policy.yamlnodes import parse_documents, plain
from tests.conftest import EXAMPLES, REPO

KUBERNETES_VERSION = "1.33.0"
MANIFESTS = REPO / "manifests"
SAMPLES = MANIFESTS / "samples"


def documents(path: Path) -> list[dict[str, Any]]:
    return [plain(document) for document in parse_documents(path.read_text())]


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if SAMPLES not in p.parents and p.name != "kustomization.yaml")


def crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in sorted((MANIFESTS / "crds").glob("*.yaml")):
        for crd in documents(path):
            schemas[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schemas


def validate_against_crd(document: dict[str, Any]) -> None:
    # OpenAPI v3's schema object is JSON Schema draft 4 with extensions (x-kubernetes-*, formats like cidr),
    # which a draft 4 validator ignores.
    jsonschema.Draft4Validator(crd_schemas()[document["kind"]]).validate(document)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_wrong_field() -> None:
    daemonset = documents(MANIFESTS / "daemonset" / "daemonset.yaml")[0]
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitys"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_names_every_manifest() -> None:
    kustomization = documents(MANIFESTS / "kustomization.yaml")[0]
    assert sorted(MANIFESTS / name for name in kustomization["resources"]) == manifest_files()


def test_crds_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_crds", REPO / "scripts" / "generate-crds.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    for name, document in generator.CRDS.items():
        assert (MANIFESTS / "crds" / name).read_text() == generator.render(document), "run scripts/generate-crds.py"


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_sample_matches_the_crd_and_sidecarless(path: Path) -> None:
    for document in documents(path):
        validate_against_crd(document)
    parse_policy_file(str(path), path.read_text())  # raises PolicyFileError with file:line:field


def test_the_billing_sample_is_the_example() -> None:
    assert documents(SAMPLES / "billing-api.yaml") == documents(
        EXAMPLES / "billing-api" / "policies" / "billing-api.yaml"
    )


def test_every_example_policy_matches_the_crds() -> None:
    """The CRD schema accepts all the policies the lab's examples and scenarios use (it must not be narrower
    than what sidecarless implements)."""
    checked = 0
    for path in sorted(
        [*EXAMPLES.rglob("policies*/*.yaml"), *(REPO / "tests" / "scenarios").rglob("policies*/*.yaml")]
    ):
        for document in documents(path):
            if document.get("kind") in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
                validate_against_crd(document)
                checked += 1
    assert checked > 10


def test_the_crd_schema_catches_a_wrong_value() -> None:
    sample = documents(SAMPLES / "billing-api.yaml")[0]
    sample["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["protocol"] = "TPC"
    with pytest.raises(jsonschema.ValidationError, match="TPC"):
        validate_against_crd(sample)
