"""What operators see (issue 5): monitor, status, Envoy and datapath inspection, metrics."""

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecarless.api.client import agent_get, agent_status
from sidecarless.envoy.workers import available_cpus
from sidecarless.lab.node import Lab
from sidecarless.xds.render import ORIGINAL_DESTINATION_CLUSTER
from tests.e2e.conftest import (
    BILLING,
    CLI,
    Monitor,
    billing,
    lab_name,
    status_code,
    tcp_echo,
    wait_until,
    write_policy,
)
from tests.unit.test_cli_front_door import run_in_process

API_PORT = 9876


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with billing("observe", "policies-with-5432", ("--api-address", f"127.0.0.1:{API_PORT}")) as lab:
        yield lab


def cli(lab: Lab, *arguments: str) -> str:
    result = subprocess.run([*CLI, *arguments, "--lab", lab.name], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _monitors(lab: Lab) -> int:
    return int(agent_status(lab.agent_socket)["monitors"])


def test_a_monitor_that_goes_away_is_forgotten_at_once(lab: Lab) -> None:
    """Not at the next event: until then the agent would keep logging every request for nobody."""
    monitor = Monitor(lab)
    monitor.wait_live(lab)
    assert _monitors(lab) == 1
    monitor.stop()
    wait_until(lambda: _monitors(lab) == 0, "the agent to forget the monitor", timeout_s=5.0)


def test_monitor_shows_drops_and_l7_verdicts_and_nothing_from_envoy_for_5432(lab: Lab) -> None:
    monitor = Monitor(lab)
    monitor.wait_live(lab)
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
    assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
    assert tcp_echo(lab, "finance-batch", 5432)
    wait_until(lambda: sum(e["type"] == "l7" for _, e in monitor.events) >= 2, "the L7 events", timeout_s=10.0)
    events = monitor.stop()
    drops = [e for _, e in events if e["type"] == "drop" and e["source"]["name"] == "production/dev-tool"]  # type: ignore[index]
    assert drops, events
    drop = drops[0]
    assert drop["destination"] == {**drop["destination"], "name": "production/billing-api", "port": 8080}  # type: ignore[dict-item]
    assert drop["reason"] == "Policy denied" and drop["source"]["identity"] > 255  # type: ignore[index]
    denied = [e for _, e in events if e["type"] == "l7" and e["method"] == "POST"]
    assert denied and denied[0]["status"] == 403 and denied[0]["verdict"] == "Denied"
    forwarded = [e for _, e in events if e["type"] == "l7" and e["method"] == "GET"]
    assert forwarded and forwarded[0]["status"] == 200 and forwarded[0]["verdict"] == "Forwarded"
    assert not [e for _, e in events if e["type"] == "l7" and e["destination"]["port"] == 5432]  # type: ignore[index]
    # Each event reached the monitor within 100 ms of its packet (drops) or of its request's end (L7).
    for arrived, event in events:
        happened = float(event["time"]) + float(event["latency_ms"]) / 1000  # type: ignore[arg-type]
        assert arrived - happened < 0.1, (arrived - happened, event)


def test_monitor_filters_by_type_and_pod(lab: Lab) -> None:
    monitor = Monitor(lab, "--type", "l7", "--from", "prometheus")
    monitor.wait_live(lab)
    status_code(lab, "finance-batch", "GET", "/metrics")
    status_code(lab, "prometheus", "GET", "/metrics")
    wait_until(lambda: len(monitor.events) >= 1, "a filtered event", timeout_s=10.0)
    time.sleep(0.2)
    events = [e for _, e in monitor.stop()]
    assert events and all(e["type"] == "l7" and e["source"]["name"] == "production/prometheus" for e in events)  # type: ignore[index]


def test_status_has_every_section_with_real_values(lab: Lab) -> None:
    status = json.loads(cli(lab, "status", "-o", "json"))
    assert status["ready"] and status["version"] and status["uptime_s"] > 0
    assert status["envoy"]["pid"] and status["envoy"]["version"].startswith("1.") and status["envoy"]["connected"]
    assert {t: x["state"] for t, x in status["xds"].items()} == {
        "cluster": "SYNCED",
        "listener": "SYNCED",
        "route": "SYNCED",
    }
    assert all(x["accepted_version"] for x in status["xds"].values())
    assert sorted(status["datapath"]["programs"]) == ["lxc0", "lxc1", "lxc2", "lxc3"]
    assert status["datapath"]["programs"]["lxc0"] == {"ingress": ["from_pod"], "egress": ["to_pod"]}
    maps = status["datapath"]["maps"]
    assert maps["scl_endpoints"] == {
        "entries": 8,
        "max_entries": 4096,
    }  # 4 pods, each address and maps["scl_policy"]["entries"] >= 3
    assert status["policies"]["count"] == 1 and status["policies"]["rejected"] == {}
    assert {e["pod"] for e in status["endpoints"]} == {
        f"production/{p}" for p in ("billing-api", "prometheus", "finance-batch", "dev-tool")
    }
    assert {(r["pod"], r["ports"], r["listener"]) for r in status["redirects"]} == {
        ("production/billing-api", "8080", "sidecarless/ingress")
    }
    assert status["last_policy_to_enforced_s"] > 0
    text = cli(lab, "status", "--verbose")
    assert "xDS route:    SYNCED" in text and "production/billing-api" in text


def test_status_shows_nacked_with_envoys_message_and_envoy_restarts(tmp_path: Path) -> None:
    lab = Lab(lab_name("obs-nack"))
    policy = (BILLING / "policies" / "billing-api.yaml").read_text()
    write_policy(tmp_path / "good", "billing-api.yaml", policy)
    write_policy(
        tmp_path / "bad",
        "billing-api.yaml",
        policy.replace("path: /metrics", "path: '/metrics/(daily|weekly|monthly)/[0-9]+/[a-z]+'"),
    )
    try:
        lab.up(BILLING / "pods.yaml", tmp_path / "good", ("--envoy-runtime", "re2.max_program_size.error_level=30"))
        with pytest.raises(Exception, match="rejected"):
            lab.apply(tmp_path / "bad", timeout_s=5)
        status = json.loads(cli(lab, "status", "-o", "json"))
        assert status["xds"]["route"]["state"] == "NACKED" and "program size" in status["xds"]["route"]["message"]
        assert "NACKED" in cli(lab, "status")
        os.kill(status["envoy"]["pid"], signal.SIGKILL)
        wait_until(
            lambda: json.loads(cli(lab, "status", "-o", "json"))["envoy"]["restarts"] == 1,
            "the restart count",
            timeout_s=10.0,
        )
        _, metrics = agent_get(lab.agent_socket, "/metrics")
        values = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
        }
        # The restarted Envoy is offered the same configuration (a new Envoy holds nothing) and rejects it too.
        assert values[("sidecarless_xds_nacks_total", (("type", "route"),))] >= 1
        assert values[("sidecarless_envoy_restarts_total", ())] == 1
    finally:
        lab.down()


def test_envoy_rbac_and_kernel_policy_in_readable_form(lab: Lab) -> None:
    rbac = cli(lab, "envoy", "config", "rbac")
    assert "ingress/production/billing-api  (ingress rules)" in rbac
    assert "  from production/prometheus port 8080: GET /metrics" in rbac
    assert "  from production/finance-batch port 8080: POST /api/v1/invoices/export" in rbac
    policy = cli(lab, "bpf", "policy", "get", "billing-api")
    assert "app=prometheus" in policy and "redirect" in policy and "15001" in policy
    assert any("app=finance-batch" in line and "5432" in line and "allow" in line for line in policy.splitlines())
    listeners = json.loads(cli(lab, "envoy", "config", "listeners", "-o", "json"))
    assert "sidecarless/ingress" in json.dumps(listeners)
    assert "cluster_manager" in cli(lab, "envoy", "stats", "cluster_manager")
    assert "LIVE" in cli(lab, "envoy", "admin", "/server_info")
    maps = cli(lab, "bpf", "maps")
    assert "scl_policy" in maps and "scl_conntrack" in maps


def test_metrics_parse_and_move_when_exercised(lab: Lab, tmp_path: Path) -> None:
    def scrape() -> dict[str, float]:
        status, body = agent_get(lab.agent_socket, "/metrics")
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    # Nobody watching: a denial is logged (and counted), a forwarded request is not (that would cost a third
    # of the L7 path's throughput); Envoy's own counters count it.
    before = scrape()
    # Issue 18: the agent process as every Prometheus client shows it, served as Prometheus' text format.
    assert before["process_resident_memory_bytes{}"] > 16 << 20 and before["process_open_fds{}"] > 0
    assert before["process_cpu_seconds_total{}"] > 0 and before["process_start_time_seconds{}"] > 0
    assert before["python_gc_collections_total{generation=0}"] >= 0
    assert any(name.startswith("python_info{") for name in before)
    # Issue 19: how the datapath was loaded (this lab's first agent compiled the programs) and how long the agent
    # took from its process's start to ready, as status reports it.
    status = agent_status(lab.agent_socket)
    assert before["sidecarless_datapath_programs_compiled{}"] == 1 and status["datapath"]["build"]["compiled"]
    assert before["sidecarless_datapath_load_seconds{}"] == status["datapath"]["build"]["load_s"] > 0
    assert 0 < before["sidecarless_agent_ready_seconds{}"] == status["ready_after_s"] < status["uptime_s"] + 5
    headers = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-D", "-", "--unix-socket", str(lab.agent_socket), "http://agent/metrics"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    assert "content-type: text/plain; version=0.0.4; charset=utf-8" in headers.lower(), headers
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
    wait_until(
        lambda: (
            scrape()["sidecarless_l7_verdicts_total{verdict=Denied}"]
            > before["sidecarless_l7_verdicts_total{verdict=Denied}"]
        ),
        "the denial counted",
    )
    assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"  # logged after the GET would have been
    wait_until(
        lambda: (
            scrape()["sidecarless_l7_verdicts_total{verdict=Denied}"]
            >= before["sidecarless_l7_verdicts_total{verdict=Denied}"] + 2
        ),
        "the second denial counted",
    )
    assert (
        scrape()["sidecarless_l7_verdicts_total{verdict=Forwarded}"]
        == before["sidecarless_l7_verdicts_total{verdict=Forwarded}"]
    )
    # While a monitor watches, forwarded requests are logged too.
    monitor = Monitor(lab)
    monitor.wait_live(lab)
    before = scrape()
    status_code(lab, "dev-tool", "GET", "/metrics")
    status_code(lab, "prometheus", "POST", "/metrics")
    status_code(lab, "prometheus", "GET", "/metrics")
    changed = (BILLING / "policies-with-5432" / "billing-api.yaml").read_text().replace("method: GET", "method: HEAD")
    lab.apply(write_policy(tmp_path, "billing-api.yaml", changed).parent)
    lab.apply(BILLING / "policies-with-5432")
    wait_until(
        lambda: (
            scrape().get("sidecarless_l7_verdicts_total{verdict=Forwarded}", 0)
            > before.get("sidecarless_l7_verdicts_total{verdict=Forwarded}", 0)
        ),
        "L7 metrics",
        timeout_s=10.0,
    )
    after = scrape()
    monitor.stop()
    moved = [
        "sidecarless_drops_total{reason=Policy denied}",
        "sidecarless_l7_verdicts_total{verdict=Denied}",
        "sidecarless_l7_verdicts_total{verdict=Forwarded}",
        "sidecarless_policy_verdicts_total{verdict=redirect}",
        "sidecarless_policy_to_enforced_seconds_count{}",
        "sidecarless_policy_events_total{}",
        "sidecarless_compile_seconds_count{}",
        "sidecarless_push_seconds_count{}",
        "sidecarless_xds_responses_total{type=route}",
        "sidecarless_xds_acks_total{type=route}",
    ]
    for name in moved:
        assert after.get(name, 0) > before.get(name, 0), (name, before.get(name), after.get(name))
    for name in [
        "sidecarless_xds_nacks_total{type=route}",
        "sidecarless_envoy_restarts_total{}",
        "sidecarless_map_entries{map=scl_policy}",
        "sidecarless_endpoints{}",
        "sidecarless_redirects{}",
    ]:
        assert name in after, name
    assert after["sidecarless_endpoints{}"] == 4 and after["sidecarless_redirects{}"] == 2
    status, prometheus_stats = agent_get(lab.agent_socket, "/v1/envoy/admin?path=%2Fstats%2Fprometheus")
    assert status == 200 and "envoy_cluster_manager" in prometheus_stats


def test_api_serves_policies_endpoints_and_optionally_loopback_tcp(lab: Lab) -> None:
    status, body = agent_get(lab.agent_socket, "/v1/policies")
    policies = json.loads(body)
    assert status == 200 and [p["key"] for p in policies["policies"]] == ["production/billing-api-l7-policy"]
    status, body = agent_get(lab.agent_socket, "/v1/endpoints")
    assert status == 200 and len(json.loads(body)) == 4
    # The same API on loopback TCP, inside the node namespace only.
    command = ["ip", "netns", "exec", lab.node_netns, "curl", "-s", f"http://127.0.0.1:{API_PORT}/livez"]
    assert subprocess.run(command, capture_output=True, text=True).stdout == "ok\n"


def here(lab: Lab, *arguments: str) -> str:
    """The command run in this process, as the console script runs it (`main()`): the same code path to the agent
    without a Python start-up per call (the listing tests below make some thirty calls)."""
    status, out, err = run_in_process([*arguments, "--lab", lab.name])
    assert status == 0, err
    return out


def recorded_events(lab: Lab, *filters: str) -> list[dict[str, Any]]:
    """`monitor --last 4095 -j` with filters: what the agent recorded, and the command returns."""
    return [json.loads(line) for line in here(lab, "monitor", "--last", "4095", "-j", *filters).splitlines()]


def test_monitor_takes_hubble_observes_filters_on_real_events(lab: Lab) -> None:
    """Issue 18: --from-pod/--to-pod/--pod/-n/--verdict/--http-status/-t (repeatable)/--last/-f/-j, each compared
    with a selection written out by hand from everything recorded."""
    watching = Monitor(lab)  # forwarded requests and new flows are recorded while a monitor watches
    watching.wait_live(lab)
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
    assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
    assert tcp_echo(lab, "finance-batch", 5432)

    def source(e: dict[str, Any]) -> str:
        return str(e["source"]["name"])

    def destination(e: dict[str, Any]) -> str:
        return str(e["destination"]["name"])

    def is_finance_batch_flow(e: dict[str, Any]) -> bool:
        return e["type"] == "policy-verdict" and source(e) == "production/finance-batch"

    wait_until(
        lambda: (
            any(e["type"] == "l7" and e["status"] == 200 for _, e in watching.events)
            and any(is_finance_batch_flow(e) for _, e in watching.events)
        ),
        "the requests and the flow in the monitor",
        timeout_s=10.0,
    )
    recorded = recorded_events(lab)
    cases: list[tuple[tuple[str, ...], Any]] = [
        (("--verdict", "DROPPED", "--from-pod", "dev-tool"),
         lambda e: e["type"] == "drop" and source(e) == "production/dev-tool"),
        (("-t", "l7", "--verdict", "dropped"), lambda e: e["type"] == "l7" and e["verdict"] == "Denied"),
        (("--http-status", "4+"), lambda e: e["type"] == "l7" and 400 <= e["status"] < 500),
        (("--http-status", "200", "--to-pod", "production/billing-api"),
         lambda e: e["status"] == 200 and destination(e) == "production/billing-api"),
        (("-t", "policy-verdict", "--verdict", "FORWARDED", "-n", "production", "--pod", "finance-batch"),
         lambda e: e["type"] == "policy-verdict" and e["verdict"] == "allow"
         and "production/finance-batch" in (source(e), destination(e))),
        (("-t", "drop", "-t", "l7", "--from-pod", "dev-tool", "--from", "production/prometheus"),
         lambda e: e["type"] in ("drop", "l7") and source(e) in ("production/dev-tool", "production/prometheus")),
    ]  # fmt: skip
    for filters, wanted in cases:
        expected = [e for e in recorded if wanted(e)]
        assert expected, (filters, recorded)
        assert recorded_events(lab, *filters) == expected, filters
    assert recorded_events(lab, "-n", "kube-system") == []
    assert recorded_events(lab, "--last", "1") == recorded[-1:]
    coloured = here(lab, "monitor", "--last", "4095", "--color", "always", "--verdict", "DROPPED", "-t", "drop")
    assert coloured.startswith("\033[31mxx drop (Policy denied) production/dev-tool")
    # -f: the last recorded one first, then what happens next.
    following = Monitor(lab, "--last", "1", "-f", "--from-pod", "prometheus", "-t", "l7")
    wait_until(lambda: len(following.events) == 1, "the last recorded event", timeout_s=10.0)
    assert following.events[0][1] == [e for e in recorded if e["type"] == "l7" and "prometheus" in source(e)][-1]
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
    wait_until(lambda: len(following.events) == 2, "the next event", timeout_s=10.0)
    assert following.events[1][1]["status"] == 403
    following.stop()
    watching.stop()


def test_cilium_and_istioctl_users_find_their_commands(lab: Lab) -> None:
    """Issue 18: envoy config by singular name with filters and a short table, envoy admin without a leading /,
    identity list, bpf policy get --all, -o yaml, status --brief, -H unix:// before the command."""
    table = here(lab, "envoy", "config", "listener")
    assert table.startswith("LISTENER") and any(
        "ingress/production/billing-api" in line and "destination 10." in line for line in table.splitlines()
    ), table
    listeners = yaml.safe_load(here(lab, "envoy", "config", "listeners", "--pod", "billing-api", "-o", "yaml"))
    chains = [c["name"] for x in listeners["configs"] for c in x["active_state"]["listener"]["filter_chains"]]
    assert chains == ["ingress/production/billing-api"]
    on_port = json.loads(here(lab, "envoy", "config", "listener", "--port", "15001", "-o", "json"))["configs"]
    ports = {x["active_state"]["listener"]["address"]["socket_address"]["port_value"] for x in on_port}
    assert ports == {15001}
    # A mistyped directory is refused, not read as an empty set that would remove every policy.
    typo = subprocess.run([*CLI, "lab", "apply", "--policies", "/nonexistent/policies", "--lab", lab.name],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert typo.returncode == 1 and "no such directory" in typo.stderr, typo.stderr
    assert json.loads(here(lab, "status", "-o", "json"))["policies"]["count"] == 1
    routes = here(lab, "envoy", "config", "route", "--pod", "production/billing-api")
    assert "ingress/production/billing-api" in routes and "rbac" in routes and "prometheus" not in routes
    assert ORIGINAL_DESTINATION_CLUSTER in here(lab, "envoy", "config", "clusters")
    assert ORIGINAL_DESTINATION_CLUSTER in here(lab, "envoy", "admin", "clusters")
    server_info = json.loads(here(lab, "envoy", "admin", "serverinfo"))
    assert server_info["state"] == "LIVE"
    # Issue 19: the node's Envoy runs one worker per CPU it may use (this machine: no CPU quota, its cpuset).
    workers = server_info["command_line_options"]["concurrency"]
    assert workers == available_cpus() == len(os.sched_getaffinity(0)), workers
    assert json.loads(here(lab, "status", "-o", "json"))["envoy"]["workers"] == workers

    identities = {i["identity"]: i for i in json.loads(here(lab, "identity", "list", "-o", "json"))}
    endpoints = json.loads(here(lab, "status", "-o", "json"))["endpoints"]
    for endpoint in endpoints:
        assert endpoint["pod"] in identities[endpoint["identity"]]["holders"], (endpoint, identities)
    assert any("app=prometheus" in label for i in identities.values() for label in i["labels"])
    assert here(lab, "identity", "list").startswith("ID")

    every_pod = yaml.safe_load(here(lab, "bpf", "policy", "get", "--all", "-o", "yaml"))
    assert sorted(every_pod) == sorted(e["pod"] for e in endpoints)
    assert every_pod["production/billing-api"] == json.loads(
        here(lab, "bpf", "policy", "get", "billing-api", "-o", "json")
    )
    assert here(lab, "bpf", "policy", "get", "--all").startswith("POD")

    as_yaml = yaml.safe_load(here(lab, "status", "-o", "yaml"))
    assert as_yaml.keys() == json.loads(here(lab, "status", "-o", "json")).keys() and as_yaml["ready"]
    assert here(lab, "status", "--brief") == "OK\n"
    brief = subprocess.run([*CLI, "-H", f"unix://{lab.agent_socket}", "status", "--brief"], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert (brief.returncode, brief.stdout) == (0, "OK\n"), brief.stderr
    assert yaml.safe_load(here(lab, "lab", "status", "-o", "yaml"))["name"] == lab.name


def in_terminal(*arguments: str) -> str:
    """The command with its stdout and stderr on a terminal (a pty), as at a user's shell; all it wrote."""
    import pty
    import select

    controller, terminal = pty.openpty()
    process = subprocess.Popen([*CLI, *arguments], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
        assert process.wait(timeout=10) == 0, output
    return output.decode()


def test_on_a_terminal_verdicts_have_colour_and_long_commands_say_what_they_wait_for(lab: Lab) -> None:
    """Issue 18: only on a terminal (the tests above read the same commands through pipes, without either)."""
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"
    coloured = in_terminal("monitor", "--last", "50", "-t", "drop", "--lab", lab.name)
    assert "\033[31mxx drop (Policy denied)" in coloured, coloured
    applying = in_terminal("lab", "apply", "--policies", str(BILLING / "policies-with-5432"), "--lab", lab.name)
    assert "] waiting for the agent: " in applying and "\r\033[K" in applying, applying
    # The progress line is cleared before the command's own output.
    assert applying.endswith("\r\033[Klab " + lab.name + ": policies applied\r\n"), applying
