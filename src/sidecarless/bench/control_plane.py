"""`sidecarless bench control-plane`: compile, render and push costs at scale, against the real Envoy.

Policies with R HTTP rules over E synthetic endpoints (no namespaces needed: the plan and Envoy do not care
where the addresses live; Envoy's listeners bind loopback). Per (R, E): compile and render time, bytes of the
resources, send->ACK of the full configuration, and change->enforced (one rule changed, from the change to
Envoy's ACK) over a number of changes, with the agent's and Envoy's RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import signal
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecarless import __version__
from sidecarless.envoy.process import EnvoyProcess, stop_envoy
from sidecarless.policy.compile import Endpoint, Node, compile_plan
from sidecarless.policy.model import EGRESS, INGRESS, Policy
from sidecarless.policy.schema import parse_policy_file
from sidecarless.xds.render import render
from sidecarless.xds.server import AdsServer, start_server
from sidecarless.xds.snapshot import TYPE_ORDER, Snapshot

RULES_PER_POLICY = 10
APPS = 100
FULL = ((10, 100), (100, 100), (1000, 1000), (5000, 1000), (1000, 10000))
SMOKE = ((10, 100),)
DEADLINE_S = 120.0


@dataclass(frozen=True)
class Run:
    rules: int
    endpoints: int
    compile_ms: float
    render_ms: float
    bytes: int
    send_to_ack_ms: float
    change_to_enforced_p50_ms: float
    change_to_enforced_p99_ms: float
    agent_rss_mib: float
    envoy_rss_mib: float
    change_samples_ms: tuple[float, ...]


def synthetic(rules: int, endpoints: int, variant: int = 0) -> tuple[list[Policy], list[Endpoint]]:
    """E pods spread over APPS apps; R rules in policies of RULES_PER_POLICY, each app allowing the next one
    GET on its own paths. `variant` changes one rule (the first policy's last path)."""
    pods = [
        Endpoint(
            f"pod-{i}",
            "bench",
            (("app", f"app-{i % APPS}"),),
            f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            f"lxc{i}",
        )
        for i in range(endpoints)
    ]
    documents = []
    for index in range(max(1, rules // RULES_PER_POLICY)):
        paths = [f"/api/{index}/{rule}" for rule in range(RULES_PER_POLICY)]
        if index == 0:
            paths[-1] = f"/api/0/changed/{variant}"
        http = "\n".join(f"        - {{method: GET, path: {path}}}" for path in paths)
        documents.append(
            f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{index}, namespace: bench}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {{app: app-{index % APPS}}}}}\n  ingress:\n"
            f"  - fromEndpoints: [{{matchLabels: {{app: app-{(index + 1) % APPS}}}}}]\n    toPorts:\n"
            f'    - ports: [{{port: "8080", protocol: TCP}}]\n      rules:\n        http:\n{http}\n'
        )
    return list(parse_policy_file("bench.yaml", "---\n".join(documents)).policies), pods


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _until_enforced(ads: AdsServer, snapshot: Snapshot) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not all(ads.acks.accepted.get(t, {}) == snapshot.digests(t) for t in TYPE_ORDER):
        if loop.time() > deadline:
            raise TimeoutError(f"Envoy did not ACK within {DEADLINE_S} s: {ads.acks.rejected}")
        await asyncio.sleep(0.0005)


async def measure(rules: int, endpoints: int, changes: int) -> Run:
    policies, pods = synthetic(rules, endpoints)
    node = Node(ips=("10.255.255.1",))
    started = time.perf_counter()
    plan = compile_plan(policies, pods, node)
    compile_ms = (time.perf_counter() - started) * 1000
    ports = {INGRESS: _free_port(), EGRESS: _free_port()}
    started = time.perf_counter()
    snapshot = Snapshot.from_resources(render(plan, ports, listen_address="127.0.0.1"))
    render_ms = (time.perf_counter() - started) * 1000
    size = sum(len(r.body.value) for by_name in snapshot.resources.values() for r in by_name.values())
    with tempfile.TemporaryDirectory(prefix="sidecarless-bench-") as directory:
        run_dir = Path(directory)
        ads = AdsServer()
        server = await start_server(ads, str(run_dir / "xds.sock"))
        envoy = EnvoyProcess(run_dir, "sidecarless~bench", run_dir / "xds.sock")
        task = asyncio.create_task(envoy.run())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            while not ads.acks.connected:  # Envoy's start-up is not the control plane's cost
                if loop.time() > deadline:
                    raise TimeoutError("Envoy did not connect")
                await asyncio.sleep(0.005)
            sent = time.perf_counter()
            await ads.publish(snapshot)
            await _until_enforced(ads, snapshot)
            send_to_ack_ms = (time.perf_counter() - sent) * 1000
            samples = []
            for change in range(1, changes + 1):
                started = time.perf_counter()
                changed_policies, _ = synthetic(rules, endpoints, variant=change)
                changed = Snapshot.from_resources(
                    render(compile_plan(changed_policies, pods, node), ports, listen_address="127.0.0.1")
                )
                await ads.publish(changed)
                await _until_enforced(ads, changed)
                samples.append((time.perf_counter() - started) * 1000)
            envoy_rss = _rss_mib(envoy.pid) if envoy.pid else 0.0
        finally:
            task.cancel()
            await asyncio.to_thread(stop_envoy, run_dir)
            await server.stop(grace=None)
    ordered = sorted(samples)
    return Run(
        rules=rules,
        endpoints=endpoints,
        compile_ms=round(compile_ms, 2),
        render_ms=round(render_ms, 2),
        bytes=size,
        send_to_ack_ms=round(send_to_ack_ms, 2),
        change_to_enforced_p50_ms=round(statistics.median(ordered), 2),
        change_to_enforced_p99_ms=round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        agent_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        envoy_rss_mib=round(envoy_rss, 1),
        change_samples_ms=tuple(round(s, 2) for s in samples),
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so a timeout's SIGTERM still stops the Envoy this benchmark started


def run(smoke: bool, results_dir: Path) -> dict[str, object]:
    signal.signal(signal.SIGTERM, _interrupt)
    cases = SMOKE if smoke else FULL
    changes = 5 if smoke else 50
    runs = [asyncio.run(measure(rules, endpoints, changes)) for rules, endpoints in cases]
    result: dict[str, object] = {
        "kind": "control-plane",
        "smoke": smoke,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "versions": {"sidecarless": __version__},
        "runs": [asdict(r) for r in runs],
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"control-plane-{'smoke-' if smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    result["file"] = str(path)
    return result
