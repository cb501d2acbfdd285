"""The CLI as Cilium, Hubble and istioctl users expect it (issue 18): every command given bad input says so in one
line and never prints a traceback; -H before or after the command, unix:// accepted; hubble's monitor filters;
istioctl's singular names and short tables; internal commands hidden; -o yaml; progress on a terminal only."""

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecarless.cli.client import UsageError, agent_socket, print_structured, socket_path
from sidecarless.cli.main import build_parser, main
from sidecarless.cli.progress import Progress
from sidecarless.cli.views import cluster_rows, event_colour, listener_rows, route_rows, status_brief
from sidecarless.observe.events import DROP, L7, POLICY_VERDICT, Event, EventFilter, Peer, hubble_verdict

CLI = [sys.executable, "-m", "sidecarless"]
NO_AGENT = "/nonexistent/agent.sock"

# Every command, with input a user could get wrong. Safe as root: each fails before it changes anything.
BAD_INPUT: dict[tuple[str, ...], list[str]] = {
    ("agent",): ["agent", "--source", "files"],
    ("datapath", "uninstall"): ["datapath", "uninstall", "--pin-dir"],
    ("status",): ["status", "-H", "tcp://127.0.0.1:1"],
    ("monitor",): ["monitor", "--http-status", "99x", "-H", NO_AGENT],
    ("envoy", "config"): ["envoy", "config", "cluster", "--pod", "x", "-H", NO_AGENT],
    ("envoy", "stats"): ["envoy", "stats", "-H", NO_AGENT],
    ("envoy", "admin"): ["envoy", "admin", "clusters", "--lab", "no-such-lab"],
    ("envoy", "run"): ["envoy", "run", "--run-dir", "/nonexistent"],
    ("envoy", "restart"): ["-H", f"unix://{NO_AGENT}", "envoy", "restart"],
    ("bpf", "policy", "get"): ["bpf", "policy", "get", "-H", NO_AGENT],
    ("bpf", "maps"): ["bpf", "maps", "-o", "xml"],
    ("bpf", "ipcache", "list"): ["bpf", "ipcache", "list", "--lab", "no-such-lab"],
    ("bpf", "ct", "list"): ["bpf", "ct", "list", "-H", NO_AGENT],
    ("identity", "list"): ["--lab", "no-such-lab", "identity", "list"],
    ("bench", "control-plane"): ["bench", "control-plane", "--smoke", "--results"],
    ("bench", "datapath"): ["bench", "datapath", "--rounds", "3"],
    ("bench", "churn"): ["bench", "churn", "--smoke", "extra"],
    ("policy", "validate"): ["policy", "validate", "/nonexistent/policies"],
    ("policy", "trace"): ["policy", "trace", "--pods", "/nonexistent/pods.yaml", "--policies", "/nonexistent",
                          "--from", "a", "--to", "b", "--port", "80"],
    ("policy", "impact"): ["policy", "impact", "--flows", "/nonexistent.jsonl", "--policies", "/nonexistent"],
    ("policy", "hits"): ["policy", "hits", "--since", "a while", "-H", NO_AGENT],
    ("lab", "up"): ["lab", "up", "--pods", "/nonexistent/pods.yaml", "--policies", "/nonexistent", "--lab", "bad-in"],
    ("lab", "down"): ["lab", "down", "--lab", "../etc"],
    ("lab", "supervise"): ["lab", "supervise", "--name", "Not A Name"],
    ("lab", "exec"): ["lab", "exec", "--lab", "no-such-lab", "pod", "--", "true"],
    ("lab", "apply"): ["lab", "apply", "--lab", "no-such-lab", "--policies", "/nonexistent"],
    ("lab", "status"): ["lab", "status", "--name", "no-such-lab"],
    ("lab", "test"): ["lab", "test", "/nonexistent/scenario"],
    ("lab", "load"): ["lab", "load", "--to", "no-port-here"],
    ("lab", "serve"): ["lab", "serve", "--http", "eighty"],
}  # fmt: skip


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        return [prefix]
    return [leaf for name, sub in subcommands[0].choices.items() for leaf in leaf_commands(sub, (*prefix, name))]


def run_in_process(arguments: list[str]) -> tuple[int, str, str]:
    """`sidecarless ARGUMENTS` in this process: (exit status, stdout, stderr). An exception that escapes main()
    is what would print a traceback: it fails the test that runs it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(arguments)
        except SystemExit as exit:  # argparse's usage errors
            status = exit.code if isinstance(exit.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def test_every_command_given_bad_input_says_so_in_one_line_and_never_with_a_traceback() -> None:
    assert sorted(leaf_commands(build_parser())) == sorted(BAD_INPUT), "a command without a bad-input case"
    for command, arguments in BAD_INPUT.items():
        status, stdout, stderr = run_in_process(arguments)
        assert status in (1, 2), (command, status, stdout, stderr)
        # On stderr one line (argparse puts its usage before its one-line error); a report on stdout (`policy
        # validate`, `lab test`) names what is wrong.
        lines = stderr.strip().splitlines()
        assert lines or "/nonexistent" in stdout, (command, stdout, stderr)
        assert len(lines) <= 1 or lines[-1].startswith("sidecarless"), (command, stderr)


def test_the_agent_flags_go_before_or_after_the_command_and_take_a_unix_uri() -> None:
    parser = build_parser()
    for argv in (
        ["-H", "unix:///run/x.sock", "status"],
        ["status", "-H", "unix:///run/x.sock"],
        ["--host", "/run/x.sock", "bpf", "maps"],
        ["-H", "/elsewhere.sock", "bpf", "maps", "-H", "/run/x.sock"],  # the later one wins
    ):
        assert agent_socket(parser.parse_args(argv)) == Path("/run/x.sock"), argv
    assert agent_socket(parser.parse_args(["status"])) == Path("/run/sidecarless/agent.sock")
    # A global --lab is not undone by the command's own (suppressed) default.
    assert parser.parse_args(["--lab", "demo", "monitor"]).lab == "demo"
    assert parser.parse_args(["--lab", "demo", "lab", "status"]).lab == "demo"
    assert parser.parse_args(["lab", "status", "--name", "demo"]).lab == "demo"
    for wrong in ("tcp://127.0.0.1:9876", "http://localhost/", "unix://"):
        with pytest.raises(UsageError):
            socket_path(wrong)


def test_help_lists_the_public_commands_only() -> None:
    lab_help = subprocess.run([*CLI, "lab", "--help"], capture_output=True, text=True, check=True).stdout
    assert "{up,down,status,exec,apply,test,load}" in lab_help
    assert "supervise" not in lab_help and "serve" not in lab_help
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    assert "-H HOST, --host HOST" in top and "unix:///path" in top and "identity" in top
    monitor = subprocess.run([*CLI, "monitor", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--from-pod", "--to-pod", "--pod POD", "--namespace", "--verdict", "--http-status", "--last N",
                 "--follow", "--json", "-t {"):  # fmt: skip
        assert flag in monitor, flag


def event(kind: str, source: str, destination: str, verdict: str = "", status: int = 0) -> Event:
    return Event(1.0, kind, Peer("10.0.0.1", 1, 300, source), Peer("10.0.0.2", 80, 301, destination), "tcp",
                 "ingress", verdict=verdict, status=status)  # fmt: skip


DROPPED = event(DROP, "shop/dev-tool", "shop/api")
DENIED = event(L7, "shop/web", "shop/api", "Denied", 403)
SERVED = event(L7, "shop/web", "shop/api", "Forwarded", 200)
FAILED = event(L7, "shop/web", "shop/api", "Error", 503)
ALLOWED = event(POLICY_VERDICT, "shop/web", "other/db", "allow")
PROXIED = event(POLICY_VERDICT, "shop/web", "shop/api", "redirect")
TO_WORLD = event(DROP, "shop/web", "world (198.51.100.7)")
EVENTS = [DROPPED, DENIED, SERVED, FAILED, ALLOWED, PROXIED, TO_WORLD]


@pytest.mark.parametrize(
    ("event_filter", "expected"),
    [
        (EventFilter(), EVENTS),
        (EventFilter(verdicts=("DROPPED",)), [DROPPED, DENIED, TO_WORLD]),
        (EventFilter(verdicts=("FORWARDED",)), [SERVED, ALLOWED]),
        (EventFilter(verdicts=("REDIRECTED", "ERROR")), [FAILED, PROXIED]),
        (EventFilter(types=(L7,), verdicts=("DROPPED",)), [DENIED]),
        (EventFilter(http_statuses=("4+",)), [DENIED]),
        (EventFilter(http_statuses=("5xx", "200")), [SERVED, FAILED]),
        (EventFilter(from_pods=("dev-tool", "shop/nobody")), [DROPPED]),
        (EventFilter(to_pods=("other/db",)), [ALLOWED]),
        (EventFilter(to_pods=("db",), from_pods=("dev-tool",)), []),  # two filters: both must hold
        (EventFilter(pods=("db",)), [ALLOWED]),
        (EventFilter(namespaces=("other",)), [ALLOWED]),
        (EventFilter(namespaces=("world (198.51.100.7)",)), []),  # the world has no namespace
        (EventFilter(types=(DROP, POLICY_VERDICT), pods=("web",)), [ALLOWED, PROXIED, TO_WORLD]),
    ],
)
def test_monitor_filters_as_hubble_observe(event_filter: EventFilter, expected: list[Event]) -> None:
    assert [e for e in EVENTS if event_filter.matches(e)] == expected
    # The same filter sent to the agent as a query comes back the same.
    assert EventFilter.from_query(event_filter.query()) == event_filter


def test_verdict_words_are_hubbles_and_bad_filters_are_refused() -> None:
    assert [hubble_verdict(e) for e in EVENTS] == [
        "DROPPED", "DROPPED", "FORWARDED", "ERROR", "FORWARDED", "REDIRECTED", "DROPPED"
    ]  # fmt: skip
    assert EventFilter.from_query([("type", "all"), ("from", "web"), ("verdict", "dropped")]) == EventFilter(
        from_pods=("web",), verdicts=("DROPPED",)
    )
    for wrong in ([("type", "trace")], [("verdict", "LOST")], [("http_status", "99")], [("http_status", "6+")]):
        with pytest.raises(ValueError):
            EventFilter.from_query(wrong)
    assert "\033[31m" in event_colour(DROPPED, "x") and "\033[32m" in event_colour(SERVED, "x")


LISTENERS = {
    "configs": [
        {"active_state": {"listener": {
            "name": "sidecarless/ingress",
            "address": {"socket_address": {"address": "::", "port_value": 15001}},
            "filter_chains": [
                {"name": "ingress/shop/api", "filter_chain_match": {"prefix_ranges": [
                    {"address_prefix": "10.0.0.2", "prefix_len": 32}, {"address_prefix": "fd00::2", "prefix_len": 128}]}},
                {"name": "ingress/shop/db", "filter_chain_match": {"prefix_ranges": [
                    {"address_prefix": "10.0.0.3", "prefix_len": 32}]}},
            ],
        }}},
        {"active_state": {"listener": {
            "name": "sidecarless/egress",
            "address": {"socket_address": {"address": "::", "port_value": 15002}},
            "filter_chains": [{"name": "egress/shop/web", "filter_chain_match": {"source_prefix_ranges": [
                {"address_prefix": "10.0.0.4", "prefix_len": 32}]}}],
        }}},
    ]
}  # fmt: skip


def test_envoy_config_tables_and_filters_as_istioctl_proxy_config() -> None:
    _, rows = listener_rows(LISTENERS, None, None, None)
    assert [(r["listener"], r["chain"]) for r in rows] == [
        ("sidecarless/ingress", "ingress/shop/api"), ("sidecarless/ingress", "ingress/shop/db"),
        ("sidecarless/egress", "egress/shop/web"),
    ]  # fmt: skip
    assert rows[0]["match"] == "destination 10.0.0.2/32, fd00::2/128" and rows[2]["match"] == "source 10.0.0.4/32"
    kept, rows = listener_rows(LISTENERS, "api", None, None)
    assert [r["chain"] for r in rows] == ["ingress/shop/api"]
    assert [c["name"] for c in kept["configs"][0]["active_state"]["listener"]["filter_chains"]] == ["ingress/shop/api"]
    assert [r["listener"] for r in listener_rows(LISTENERS, None, 15002, None)[1]] == ["sidecarless/egress"]
    assert listener_rows(LISTENERS, None, None, "sidecarless/egress")[1][0]["address"] == ":::15002"
    assert listener_rows(LISTENERS, "nobody", None, None) == ({"configs": []}, [])
    routes = {"configs": [{"route_config": {"name": f"ingress/shop/{pod}", "virtual_hosts": [{"domains": ["*"], "routes": [
        {"typed_per_filter_config": {"envoy.filters.http.rbac/ingress": {}}}]}]}} for pod in ("api", "db")]}  # fmt: skip
    assert route_rows(routes, "shop/db", None)[1] == [
        {"name": "ingress/shop/db", "domains": "*", "routes": 1, "filters": "rbac/ingress"}
    ]
    clusters = {"configs": [{"cluster": {"name": "original-destination", "type": "ORIGINAL_DST"}}]}
    assert cluster_rows(clusters, "other")[1] == [] and cluster_rows(clusters, None)[1][0]["type"] == "ORIGINAL_DST"


def test_yaml_output_and_the_brief_status() -> None:
    out = io.StringIO()
    sys.stdout, saved = out, sys.stdout
    try:
        print_structured({"ready": True, "pods": ["a/b"]}, "yaml")
    finally:
        sys.stdout = saved
    assert yaml.safe_load(out.getvalue()) == {"ready": True, "pods": ["a/b"]}
    healthy = {"ready": True, "pending": [], "envoy": {"connected": True}, "xds": {"route": {"state": "SYNCED"}}}
    assert status_brief(healthy) == ("OK", True)
    sick = {**healthy, "ready": False, "pending": ["datapath"], "xds": {"route": {"state": "NACKED"}}}
    assert status_brief(sick) == ("NOT OK: agent not ready (datapath); Envoy rejected route", False)


def test_progress_is_shown_on_a_terminal_only() -> None:
    pipe = io.StringIO()
    progress = Progress(pipe)
    progress("waiting for the agent")
    progress.done()
    assert pipe.getvalue() == ""
    terminal = io.StringIO()
    progress = Progress(terminal, enabled=True)
    progress("waiting for the agent: datapath")
    progress("waiting for the agent: datapath")  # said once
    progress.done()
    assert terminal.getvalue().count("waiting for the agent: datapath") == 1 and terminal.getvalue().endswith("\033[K")
