"""The parser (and the compiler behind it) on random mutations of valid policies: a mutation is accepted or
rejected with PolicyFileError naming file and line, never a crash."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecarless.lab.pods import NODE_IP, endpoints_of, parse_pods, place
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import parse_policy_file

TESTS = Path(__file__).resolve().parents[1]
VALID = sorted(
    path.read_text()
    for path in [
        *(TESTS / "scenarios").glob("*/policies/*.yaml"),
        *(TESTS.parent / "examples" / "billing-api").glob("*/*.yaml"),
    ]
)
PODS = place(parse_pods("pods.yaml", (TESTS / "scenarios" / "pods.yaml").read_text()))
YAMLISH = st.sampled_from(
    [*list(" \n\t-:{}[],'\"#&*!|>%@`"), "port", "80", "TCP", "null", "~", "0x1F", "1e9", "[]", "{}"]
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "duplicate-line", "swap-lines", "replace-token"]))
        lines = text.split("\n")
        if kind == "delete" and text:
            start = draw(st.integers(0, len(text) - 1))
            text = text[:start] + text[start + draw(st.integers(1, 20)) :]
        elif kind == "insert":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + "".join(draw(st.lists(YAMLISH, min_size=1, max_size=6))) + text[at:]
        elif kind == "duplicate-line":
            index = draw(st.integers(0, len(lines) - 1))
            lines.insert(index, lines[index])
            text = "\n".join(lines)
        elif kind == "swap-lines" and len(lines) > 1:
            first, second = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[first], lines[second] = lines[second], lines[first]
            text = "\n".join(lines)
        elif kind == "replace-token":
            tokens = text.split(" ")
            index = draw(st.integers(0, len(tokens) - 1))
            tokens[index] = draw(
                st.sampled_from(["0", "-1", "99999", "''", "[]", "{}", "null", "true", "ANY", "http", "{{", "ä"])
            )
            text = " ".join(tokens)
    return text


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_mutated_policy_is_accepted_or_rejected_never_a_crash(text: str) -> None:
    try:
        documents = parse_policy_file("mutated.yaml", text)
    except PolicyFileError as error:
        assert error.errors and all(e.file == "mutated.yaml" and e.line >= 1 for e in error.errors)
        return
    compile_plan(documents.policies, endpoints_of(PODS), Node(ips=(NODE_IP,)), documents.secrets)


def test_hostile_yaml_is_rejected_not_a_crash() -> None:
    for text in [
        "[" * 5000 + "]" * 5000,
        "x: " + "{a: " * 3000 + "1" + "}" * 3000,
        "spec: &a [*a]\n",
        "a: !!python/object:os.system ls\n",
        "\ufeffapiVersion: cilium.io/v2\n\x00",
    ]:
        try:
            parse_policy_file("hostile.yaml", text)
        except PolicyFileError as error:
            assert error.errors[0].file == "hostile.yaml"
        else:
            raise AssertionError(f"accepted {text[:40]!r}")
