"""Verdict tables (../shared/conformance/README.md): run each case with real curl and nc from a lab pod.

A scenario folder holds pods.yaml, policies/ and cases.yaml; `stages` apply further policy folders and run
the cases of that stage.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from sidecarless.lab.image import Image
from sidecarless.lab.node import Lab, PrepareAgent
from sidecarless.lab.pods import Placement, Pod, endpoints_of, node_addresses, parse_pods, place
from sidecarless.lab.topology import LabError
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node
from sidecarless.policy.plan import Plan
from sidecarless.policy.trace import Request, Trace, trace
from sidecarless.sources.files import PolicyDirectory

DROP_TIMEOUT_S = 1.5  # a dropped SYN gets no answer: the client gives up after this
REQUEST_TIMEOUT_S = 5.0
# The cases of a stage only read (requests between pods), so they run side by side: a dropped case waits out
# its timeout without holding up the others.
CONCURRENT_CASES = 8
EXPECTATIONS = ("dropped", "connects", "not_2xx")


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    destination: str
    port: int
    expect: int | str
    stage: str | None = None
    proto: str = "http"
    method: str = "GET"
    path: str = "/"
    headers: tuple[str, ...] = ()
    curl_args: tuple[str, ...] = ()
    backend_path: str | None = None
    backend_header: dict[str, str | None] = field(default_factory=dict)
    family: int | None = None  # 4 or 6: the flow over that family (curl -4/-6, nc -4/-6); None: as resolved


@dataclass(frozen=True)
class Outcome:
    case: Case
    observed: str  # an HTTP status, "dropped", "connects", "error: ..."
    passed: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        c = self.case
        request = (
            f"tcp {c.destination}:{c.port}" if c.proto == "tcp" else f"{c.method} {c.destination}:{c.port}{c.path}"
        )
        text = f"{mark} {c.id:<40} {c.source:>14} -> {request:<48} expected {c.expect!s:<8} got {self.observed}"
        return f"{text}  ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Stage:
    name: str | None
    policies: str | None


@dataclass(frozen=True)
class Scenario:
    directory: Path
    stages: tuple[Stage, ...]
    cases: tuple[Case, ...]


def load_scenario(directory: Path) -> Scenario:
    document = yaml.safe_load((directory / "cases.yaml").read_text())
    stages = [Stage(None, None)]
    for stage in document.get("stages") or []:
        if stage is not None:
            stages.append(Stage(stage["name"], stage["policies"]))
    cases = []
    for raw in document["cases"]:
        cases.append(
            Case(
                id=raw["id"],
                source=raw["from"],
                destination=raw["to"],
                port=int(raw["port"]),
                expect=raw["expect"],
                stage=raw.get("stage"),
                proto=raw.get("proto", "http"),
                method=raw.get("method", "GET"),
                path=raw.get("path", "/"),
                headers=tuple(raw.get("headers", ())),
                curl_args=tuple(raw.get("curl_args", ())),
                backend_path=raw.get("backend_path"),
                backend_header=raw.get("backend_header") or {},
                family=_family(raw.get("family"), raw["id"]),
            )
        )
    return Scenario(directory, tuple(stages), tuple(cases))


def _family(value: object, case_id: str) -> int | None:
    if value not in (None, 4, 6):
        raise ValueError(f"case {case_id}: family must be 4 or 6, not {value!r}")
    return value


def in_each_family(case: Case, families_of: Callable[[str], set[int]]) -> list[Case]:
    """A case without a family runs once in each family both its ends have, expecting the same verdict in each
    (a policy is family-independent); a case with one runs as written."""
    if case.family is not None:
        return [case]
    shared = sorted(families_of(case.source) & families_of(case.destination))
    if len(shared) < 2:
        return [case]
    return [replace(case, id=f"{case.id} (IPv{family})", family=family) for family in shared]


def lab_families(lab: Lab) -> Callable[[str], set[int]]:
    """The families a case's end has in `lab`: a pod's or external host's addresses, or an address literal's."""
    pods = lab.pods()

    def families_of(reference: str) -> set[int]:
        try:
            return {ipaddress.ip_address(reference).version}
        except ValueError:
            pass
        named = [pod for pod in pods if pod.is_named(reference)]
        return named[0].families if named else set()  # unknown: the case runs once and reports what curl says

    return families_of


def _family_flag(case: Case) -> list[str]:
    return [f"-{case.family}"] if case.family else []


def run_case(lab: Lab, case: Case, drop_timeout_s: float = DROP_TIMEOUT_S) -> Outcome:
    if case.proto in ("tcp", "udp"):
        return _run_echo(lab, case, drop_timeout_s)
    return _run_http(lab, case, drop_timeout_s)


def _run_http(lab: Lab, case: Case, drop_timeout_s: float) -> Outcome:
    url = f"http://{case.destination}:{case.port}{case.path}"
    # `-X HEAD` would make curl wait for the body a HEAD answer never has, until --max-time.
    method = ["--head"] if case.method == "HEAD" else ["-X", case.method]
    command = [
        "curl", "-sS", *_family_flag(case), "--path-as-is", *method, "-o", "-", "-w", "\n%{http_code}",
        "--connect-timeout", str(drop_timeout_s), "--max-time", str(REQUEST_TIMEOUT_S),
        *[argument for header in case.headers for argument in ("-H", header)], *case.curl_args, url,
    ]  # fmt: skip
    result = subprocess.run(lab.exec_command(case.source, command), text=True, capture_output=True, timeout=30)
    body, _, code = result.stdout.rpartition("\n")
    if result.returncode == 28 and code in ("000", ""):
        observed = "dropped"  # curl: operation timed out, no response
    elif code.isdigit() and code != "000":
        observed = code
    else:
        observed = f"error: curl exit {result.returncode}: {result.stderr.strip()}"
    passed = _status_matches(observed, case.expect)
    detail = ""
    if passed and observed.startswith("2"):
        passed, detail = _check_backend(case, body)
    return Outcome(case, observed, passed, detail)


def _status_matches(observed: str, expect: int | str) -> bool:
    if expect == "not_2xx":
        return not observed.startswith("2")
    return observed == str(expect)


def _check_backend(case: Case, body: str) -> tuple[bool, str]:
    """What the backend received, from the lab server's description of the request."""
    if case.backend_path is None and not case.backend_header:
        return True, ""
    try:
        received: dict[str, Any] = json.loads(body)
    except json.JSONDecodeError:
        return False, "response is not the lab server's request description"
    if case.backend_path is not None and received["path"] != case.backend_path:
        return False, f"backend saw path {received['path']!r}"
    headers = {key.lower(): value for key, value in received["headers"].items()}
    for name, value in case.backend_header.items():
        if headers.get(name.lower()) != value:
            return False, f"backend saw {name}: {headers.get(name.lower())!r}"
    return True, ""


def run_scenario(
    directory: Path,
    lab_name: str,
    report: Callable[[str], None] = print,
    agent_options: tuple[str, ...] = (),
    prepare_agent: PrepareAgent | None = None,
    apply: Callable[[Lab, Path], list[str]] = Lab.apply,
    agent_capabilities: tuple[str, ...] | None = None,
    nodes: Mapping[str, str] | None = None,
    agent_image: Image | None = None,
) -> list[Outcome]:
    """A fresh lab for the scenario, each stage's cases, then the lab removed (also on failure).
    `prepare_agent` and `apply` let the policies come from elsewhere than the lab's files (Kubernetes).
    `nodes`: the node of each pod the file puts on none (pod key or external name -> node name)."""
    scenario = load_scenario(directory)
    lab = Lab(lab_name)
    if nodes:
        report("-- nodes: " + ", ".join(f"{pod} on {node}" for pod, node in nodes.items()))
    try:
        lab.up(directory / "pods.yaml", directory / "policies", agent_options, prepare_agent, agent_capabilities,
               nodes=nodes, agent_image=agent_image)  # fmt: skip
        return _run_stages(lab, scenario, apply, report)
    finally:
        lab.down()


def run_scenarios_in_one_lab(
    directories: Sequence[Path],
    lab_name: str,
    report: Callable[[str], None] = print,
    nodes: Mapping[str, str] | None = None,
) -> dict[Path, list[Outcome]]:
    """Scenarios that share one pod file, one after another in one lab: each one's policies applied to the
    running lab (as an operator changes policy), then its stages' cases. A lab's start costs more than most
    tables; this also runs every table right after a policy change."""
    pods = {(directory / "pods.yaml").read_text() for directory in directories}
    if len(pods) != 1:
        raise LabError("the scenarios do not share one pod file")
    lab = Lab(lab_name)
    if nodes:
        report("-- nodes: " + ", ".join(f"{pod} on {node}" for pod, node in nodes.items()))
    outcomes: dict[Path, list[Outcome]] = {}
    try:
        lab.up(directories[0] / "pods.yaml", directories[0] / "policies", nodes=nodes)
        for directory in directories:
            report(f"== {directory.name}")
            errors = lab.apply(directory / "policies")
            if errors:
                raise LabError(f"{directory.name}: policies rejected:\n" + "\n".join(errors))
            outcomes[directory] = _run_stages(lab, load_scenario(directory), Lab.apply, report)
    finally:
        lab.down()
    return outcomes


def _run_stages(
    lab: Lab, scenario: Scenario, apply: Callable[[Lab, Path], list[str]], report: Callable[[str], None]
) -> list[Outcome]:
    """Each stage of a scenario in a running lab: its policies applied (after the first), then its cases."""
    outcomes: list[Outcome] = []
    for stage in scenario.stages:
        if stage.policies is not None:
            errors = apply(lab, scenario.directory / stage.policies)
            if errors:
                raise LabError("stage policies rejected:\n" + "\n".join(errors))
            report(f"-- stage {stage.name}: applied {stage.policies}")
        families_of = lab_families(lab)
        staged = [case for case in scenario.cases if case.stage == stage.name]
        cases = [each for case in staged for each in in_each_family(case, families_of)]
        with ThreadPoolExecutor(max_workers=CONCURRENT_CASES) as pool:
            for outcome in pool.map(partial(run_case, lab), cases):  # in the table's order
                outcomes.append(outcome)
                report(outcome.line())
    return outcomes


def spread_scenario(directories: Sequence[Path], count: int) -> dict[str, str]:
    """The pods of scenarios that share one pod file spread over `count` nodes, for all their cases
    (spread_over_nodes)."""
    pods_file = directories[0] / "pods.yaml"
    cases = [case for directory in directories for case in load_scenario(directory).cases]
    return spread_over_nodes(parse_pods(str(pods_file), pods_file.read_text()), cases, count)


def spread_over_nodes(pods: list[Pod], cases: Sequence[Case], count: int) -> dict[str, str]:
    """Each pod the file puts on no node onto one of `count` nodes (node-1, node-2, ...), so that as many cases
    as it can cross nodes: in file order, each pod goes where the fewest of the cases between it and the pods
    already placed stay on one node (greedy, which crosses at least half of them with two nodes), the node
    with fewer pods on a tie. Pod key, or an external host's name -> node name."""
    names = [f"node-{index}" for index in range(1, count + 1)]
    placed: dict[str, str] = {pod.key: pod.node for pod in pods if pod.node}

    def key_of(reference: str) -> str | None:
        return next((pod.key for pod in pods if reference in (pod.name, pod.key)), None)

    pairs = [(key_of(case.source), key_of(case.destination)) for case in cases]
    for pod in pods:
        if pod.key in placed:
            continue
        peers = [b if a == pod.key else a for a, b in pairs if pod.key in (a, b) and a != b]
        together = {name: sum(placed.get(peer or "") == name for peer in peers) for name in names}
        load = {name: sum(node == name for node in placed.values()) for name in names}
        placed[pod.key] = min(names, key=lambda name: (together[name], load[name]))
    return {pod.key: placed[pod.key] for pod in pods if not pod.node}


def _run_echo(lab: Lab, case: Case, drop_timeout_s: float) -> Outcome:
    """A TCP or UDP exchange with the echo server: `connects` when the payload comes back."""
    payload = f"sidecarless-{case.id}\n"
    wait = str(max(1, round(drop_timeout_s)))
    flags = ["-u", "-w", wait] if case.proto == "udp" else ["-N", "-w", wait]
    command = lab.exec_command(case.source, ["nc", *_family_flag(case), *flags, case.destination, str(case.port)])
    result = subprocess.run(command, input=payload, text=True, capture_output=True, timeout=REQUEST_TIMEOUT_S + 5)
    if result.stdout == payload:
        observed = "connects"
    elif not result.stdout:
        observed = "dropped"
    else:
        observed = f"error: exit {result.returncode}, echoed {result.stdout!r}"
    return Outcome(case, observed, observed == case.expect)


def run_offline(directory: Path) -> list[Outcome]:
    """The scenario's cases through `policy trace` instead of the lab: what the plan says each case gives."""
    scenario = load_scenario(directory)
    placements = place(parse_pods(str(directory / "pods.yaml"), (directory / "pods.yaml").read_text()))
    outcomes = []
    for stage in scenario.stages:
        policies = PolicyDirectory(directory / (stage.policies or "policies")).read_if_changed()
        assert policies is not None
        node = Node(ips=node_addresses(placements))
        plan = compile_plan(policies.policies, endpoints_of(placements), node, policies.secrets)
        outcomes += [offline_outcome(plan, placements, case) for case in scenario.cases if case.stage == stage.name]
    return outcomes


def _request_target(case: Case) -> str:
    """The path curl sends: the case's, or the one `--request-target` gives (absolute form reduced to it)."""
    arguments = list(case.curl_args)
    if "--request-target" not in arguments:
        return case.path
    target = arguments[arguments.index("--request-target") + 1]
    if "://" in target:
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return target


def offline_trace(plan: Plan, placements: list[Placement], case: Case) -> Trace:
    """`policy trace` of a case, with what curl or nc would send."""
    external = {p.pod.name: p.pod.external_ip for p in placements if p.pod.external_ip is not None}
    source, destination = (
        external.get(case.source, case.source),
        external.get(case.destination, case.destination),
    )
    if case.proto in ("tcp", "udp"):
        return trace(plan, source, destination, case.port, case.proto.upper(), family=case.family)
    headers = tuple((n.strip(), v.strip()) for n, _, v in (h.partition(":") for h in case.headers))
    # curl sends Host: destination:port unless the case gives its own.
    given_host = any(name.lower() == "host" for name, _ in headers)
    host = None if given_host else f"{case.destination}:{case.port}"
    request = Request(case.method, _request_target(case), host, headers)
    return trace(plan, source, destination, case.port, "TCP", request, family=case.family)


def offline_outcome(plan: Plan, placements: list[Placement], case: Case) -> Outcome:
    """What `policy trace` says a case gives, in the terms the lab reports."""
    result = offline_trace(plan, placements, case)
    if case.proto in ("tcp", "udp"):
        observed = "dropped" if result.verdict in ("dropped", "denied") else "connects"
        return Outcome(case, observed, observed == case.expect)
    observed = "dropped" if result.verdict == "dropped" else str(result.status or 200)
    passed, detail = _status_matches(observed, case.expect), ""
    if passed and result.backend_headers is not None and case.backend_header:
        received: dict[str, str] = {}
        for name, value in result.backend_headers:
            received[name] = f"{received[name]}, {value}" if name in received else value
        for name, expected in case.backend_header.items():
            if received.get(name.lower()) != expected:
                passed, detail = False, f"backend would see {name}: {received.get(name.lower())!r}"
    return Outcome(case, observed, passed, detail)
