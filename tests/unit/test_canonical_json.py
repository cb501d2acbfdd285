"""The Kubernetes source's documents (canonical JSON) read by the JSON parser give exactly the nodes, values and
lines that YAML's reader gives for the same text."""

import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecarless.policy.yamlnodes import Node, YamlError, parse_documents

TESTS = Path(__file__).resolve().parents[1]
POLICIES = sorted(
    [*(TESTS / "scenarios").glob("*/policies/*.yaml"), *(TESTS.parent / "examples" / "billing-api").glob("*/*.yaml")]
)


def same(fast: Node, slow: Node) -> None:
    assert (fast.line, type(fast.value)) == (slow.line, type(slow.value))
    if isinstance(fast.value, dict):
        assert list(fast.value) == list(slow.value)
        assert fast.key_lines == slow.key_lines
        for key in fast.value:
            same(fast.value[key], slow.value[key])
    elif isinstance(fast.value, list):
        assert len(fast.value) == len(slow.value)
        for a, b in zip(fast.value, slow.value, strict=True):
            same(a, b)
    else:
        assert fast.value == slow.value


def check(document: object) -> None:
    text = json.dumps(document, indent=2, sort_keys=True)
    # A leading space: the same document, read by YAML.
    try:
        (slow,) = parse_documents(" " + text)
    except YamlError as error:  # e.g. a character beyond the BMP, which YAML cannot read escaped
        with pytest.raises(YamlError, match=re.escape(error.message)):
            parse_documents(text)
        return
    (fast,) = parse_documents(text)
    same(fast, slow)


def test_every_policy_of_the_repository_as_the_kubernetes_source_hands_it_over() -> None:
    for path in POLICIES:
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict):
                check(document)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), JSONISH, max_size=5))
def test_any_json_object_reads_the_same(document: dict[str, object]) -> None:
    check(document)


def test_floats_and_other_text_are_left_to_yaml() -> None:
    (node,) = parse_documents(json.dumps({"a": 1e20}, indent=2, sort_keys=True))
    assert node.value["a"].value == "1e+20"  # YAML 1.1 reads it as a string, as before
    (node,) = parse_documents('{"b": 1, "a": 2}')  # not canonical: YAML reads it
    assert list(node.value) == ["b", "a"]
