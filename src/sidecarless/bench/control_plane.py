"""`sidecarless bench control-plane`: compile, render and push costs at scale, against the real Envoy.

Policies with R HTTP rules over E synthetic endpoints (no namespaces needed: the plan and Envoy do not care
where the addresses live; Envoy's listeners bind loopback). Per (R, E): compile and render time, bytes of the
resources, send->ACK of the full configuration, and change->enforced (one rule changed, from the change to
Envoy's ACK) over a number of changes, with the agent's and Envoy's RSS. The fake API server runs in a child
process, so the agent's RSS (this process: the source, compiler, renderer and xDS server) does not count its
objects. Then the scale case (issue 19): 20,000 policies over 100,000 pods, 2,000 of them on this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sidecarless import __version__
from sidecarless.agent import heap
from sidecarless.bench.results import (
    memory_mib,
    sigterm_ignored,
    sigterm_unwinds,
    write_result,
)
from sidecarless.envoy.process import EnvoyProcess, stop_envoy
from sidecarless.lab.fake_apiserver import FakeApiServer
from sidecarless.policy.compile import Compiler, compile_plan
from sidecarless.policy.model import EGRESS, INGRESS, Endpoint, Node, Policy
from sidecarless.policy.schema import parse_policy_bytes
from sidecarless.sources.kubernetes import KubernetesSource, pod_endpoint, policy_bytes
from sidecarless.sources.kubernetes_config import KubernetesConfig
from sidecarless.xds.render import Renderer, render
from sidecarless.xds.resources import TYPE_ORDER
from sidecarless.xds.server import AdsServer, start_server
from sidecarless.xds.snapshot import Snapshot

RULES_PER_POLICY = 10
APPS = 100
# E counts the cluster's pods; at most this many run on the node (Kubernetes' default --max-pods). The rest
# get identities (rules name them) but no listener chain: 10,000 pods on one node is no real node.
LOCAL_PODS = 110
RULE_COUNTS = (10, 100, 1000, 5000)
ENDPOINT_COUNTS = (100, 1000, 10000)
FULL = tuple((rules, endpoints) for endpoints in ENDPOINT_COUNTS for rules in RULE_COUNTS)
SMOKE = ((10, 100),)
# One policy with this many /32 prefixes (fromCIDR) put over the 10-rule cluster of 1,000 pods: each put brings
# new prefixes, so identities and the ipcache are computed anew (the worst case of a CIDR change).
PREFIX_COUNTS = (1000, 2000, 4000, 8000)
PREFIX_REPEATS = 5
PREFIX_ENDPOINTS = 1000
DEADLINE_S = 120.0
NODE_NAME = "bench-node"
NODE_IP = "10.255.255.1"


@dataclass(frozen=True)
class Shape:
    """A synthetic cluster. Policy i selects app i and admits app i+1 on TCP 8080, with `http_rules` GET rules
    when i is a multiple of `l7_every` (L3/L4 only otherwise); pod i carries app i mod `apps`, and the first
    `local` pods run on this node."""

    policies: int
    pods: int
    local: int = LOCAL_PODS
    apps: int = APPS
    http_rules: int = RULES_PER_POLICY
    l7_every: int = 1

    @staticmethod
    def grid(rules: int, endpoints: int) -> Shape:
        """The grid's cases: every policy 10 HTTP rules, 100 apps, at most 110 pods on the node."""
        return Shape(policies=max(1, rules // RULES_PER_POLICY), pods=endpoints)

    @property
    def rules(self) -> int:
        """HTTP rules in all."""
        return len(range(0, self.policies, self.l7_every)) * self.http_rules


# Issue 19's scale: most policies L3/L4, one in ten with two HTTP rules (4,000 rules), 10 pods per app.
SCALE = Shape(policies=20_000, pods=100_000, local=2_000, apps=10_000, http_rules=2, l7_every=10)
SMOKE_SCALE = Shape(policies=200, pods=1_000, local=20, apps=100, http_rules=2, l7_every=10)


@dataclass(frozen=True)
class Run:
    rules: int
    endpoints: int
    policies: int
    local_endpoints: int
    compile_ms: float
    render_ms: float
    bytes: int
    send_to_ack_ms: float
    change_to_enforced_p50_ms: float
    change_to_enforced_p99_ms: float
    change_compile_p50_ms: float  # incremental: the pods the changed policy selects
    change_render_p50_ms: float
    agent_rss_mib: float
    envoy_rss_mib: float
    change_samples_ms: tuple[float, ...]


def _pod_ip(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


def policy_object(index: int, variant: int, shape: Shape) -> dict[str, Any]:
    """Policy `index` of `shape` (see Shape); `variant` changes the last path of policy 0 (one rule changed)."""
    port: dict[str, Any] = {"ports": [{"port": "8080", "protocol": "TCP"}]}
    if index % shape.l7_every == 0:
        paths = [f"/api/{index}/{rule}" for rule in range(shape.http_rules)]
        if index == 0:
            paths[-1] = f"/api/0/changed/{variant}"
        port["rules"] = {"http": [{"method": "GET", "path": path} for path in paths]}
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"p{index}", "namespace": "bench"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": f"app-{index % shape.apps}"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": f"app-{(index + 1) % shape.apps}"}}],
                    "toPorts": [port],
                }
            ],
        },
    }


def prefix_policy_object(count: int, generation: int) -> dict[str, Any]:
    """app-0 admits GET /metrics on 8080 from `count` /32 prefixes, different for each `generation`."""
    base = (172 << 24) | ((16 + generation) << 16)
    prefixes = [f"{(base + i) >> 24}.{((base + i) >> 16) & 255}.{((base + i) >> 8) & 255}.{(base + i) & 255}/32"
                for i in range(count)]  # fmt: skip
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "prefixes", "namespace": "bench"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "app-0"}},
            "ingress": [
                {
                    "fromCIDR": prefixes,
                    "toPorts": [
                        {
                            "ports": [{"port": "8080", "protocol": "TCP"}],
                            "rules": {"http": [{"method": "GET", "path": "/metrics"}]},
                        }
                    ],
                }
            ],
        },
    }


def pod_object(index: int, shape: Shape) -> dict[str, Any]:
    node = NODE_NAME if index < shape.local else f"other-{index % 50}"
    return {
        "metadata": {"name": f"pod-{index}", "namespace": "bench", "labels": {"app": f"app-{index % shape.apps}"}},
        "spec": {"nodeName": node, "containers": [{"name": "main"}]},
        "status": {"podIP": _pod_ip(index), "phase": "Running"},
    }


def synthetic(rules: int, endpoints: int, variant: int = 0) -> tuple[list[Policy], list[Endpoint]]:
    """The grid's cluster as the API objects, parsed directly: for the compile and render timings alone."""
    return synthetic_shape(Shape.grid(rules, endpoints), variant)


def synthetic_shape(shape: Shape, variant: int = 0) -> tuple[list[Policy], list[Endpoint]]:
    policies = [
        policy
        for index in range(shape.policies)
        for policy in parse_policy_bytes(
            f"p{index}", policy_bytes("CiliumNetworkPolicy", policy_object(index, variant, shape))
        ).policies
    ]
    pods = [
        pod_endpoint(pod_object(i, shape), {}, f"lxc{i}" if i < shape.local else "", local=i < shape.local)
        for i in range(shape.pods)
    ]
    return policies, [pod for pod in pods if pod is not None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _Pipeline:
    """The agent's path from a source update to Envoy (compile, render, publish), without the datapath."""

    def __init__(self, source: KubernetesSource, ads: AdsServer, ports: dict[str, int]) -> None:
        self.source, self.ads = source, ads
        self.compiler, self.renderer = Compiler(), Renderer(ports, listen_address="127.0.0.1")
        self.snapshot: Snapshot | None = None
        self.published = 0
        self.published_at = 0.0
        self.compile_ms: list[float] = []
        self.render_ms: list[float] = []

    async def run(self) -> None:
        policy_set, node_state = None, None
        async for update in self.source.updates():
            policy_set, node_state = update.policy_set or policy_set, update.node or node_state
            if policy_set is None or node_state is None:
                continue
            started = time.perf_counter()
            plan = self.compiler.compile(policy_set.policies, node_state.endpoints, node_state.node, policy_set.secrets)
            compiled = time.perf_counter()
            self.snapshot = Snapshot.from_resources(self.renderer.render(plan))
            self.compile_ms.append((compiled - started) * 1000)
            self.render_ms.append((time.perf_counter() - compiled) * 1000)
            self.published_at = time.perf_counter()
            await self.ads.publish(self.snapshot)
            self.published += 1
            heap.settle()  # as the agent does


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {DEADLINE_S} s")
        await asyncio.sleep(0.0005)


def _changed_and_enforced(pipeline: _Pipeline, published_before: int) -> bool:
    return pipeline.published > published_before and _enforced(pipeline.ads, pipeline.snapshot)


def _enforced(ads: AdsServer, snapshot: Snapshot | None) -> bool:
    return snapshot is not None and all(ads.acks.accepted.get(t, {}) == snapshot.digests(t) for t in TYPE_ORDER)


@dataclass(frozen=True)
class PrefixRun:
    prefixes: int
    endpoints: int
    compile_ms: float  # the whole cluster with the prefix policy, from scratch
    render_ms: float
    apply_to_enforced_p50_ms: float  # the prefix policy put in the API -> Envoy ACKed all of it
    apply_to_enforced_max_ms: float
    apply_compile_p50_ms: float  # the agent's compile of that change
    apply_samples_ms: tuple[float, ...]


async def measure_prefixes(count: int, repeats: int) -> PrefixRun:
    """A policy of `count` prefixes put through the Kubernetes source, `repeats` times with new prefixes each
    time: from the watch event to Envoy's ACK, as the agent runs it."""
    heap.thaw()
    policies, pods = synthetic(RULES_PER_POLICY, PREFIX_ENDPOINTS)
    policies += list(
        parse_policy_bytes("prefixes", policy_bytes("CiliumNetworkPolicy", prefix_policy_object(count, 0))).policies
    )
    ports = {INGRESS: _free_port(), EGRESS: _free_port()}
    started = time.perf_counter()
    plan = compile_plan(policies, pods, Node(ips=(NODE_IP,)))
    compile_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    Snapshot.from_resources(render(plan, ports, listen_address="127.0.0.1"))
    render_ms = (time.perf_counter() - started) * 1000
    del plan, policies, pods
    async with _served_cluster(Shape.grid(RULES_PER_POLICY, PREFIX_ENDPOINTS), ports) as (fake, pipeline, _):
        samples, first = [], len(pipeline.compile_ms)
        for generation in range(1, repeats + 1):
            published = pipeline.published
            started = time.perf_counter()
            fake.put("ciliumnetworkpolicies", prefix_policy_object(count, generation))
            await _until(partial(_changed_and_enforced, pipeline, published), "prefix policy ACKed")
            samples.append((time.perf_counter() - started) * 1000)
        apply_compile = pipeline.compile_ms[first:]
    return PrefixRun(
        prefixes=count,
        endpoints=PREFIX_ENDPOINTS,
        compile_ms=round(compile_ms, 2),
        render_ms=round(render_ms, 2),
        apply_to_enforced_p50_ms=round(statistics.median(samples), 2),
        apply_to_enforced_max_ms=round(max(samples), 2),
        apply_compile_p50_ms=round(statistics.median(apply_compile), 2),
        apply_samples_ms=tuple(round(s, 2) for s in samples),
    )


def _populate(fake: FakeApiServer, shape: Shape) -> None:
    fake.put(
        "nodes",
        {"metadata": {"name": NODE_NAME}, "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
    )
    fake.put("namespaces", {"metadata": {"name": "bench"}})
    for index in range(shape.pods):
        fake.put("pods", pod_object(index, shape))
    for index in range(shape.policies):
        fake.put("ciliumnetworkpolicies", policy_object(index, 0, shape))


class FakeInChild:
    """The fake API server with `shape`'s objects, in a child process (spawned: a fresh interpreter, no forked
    gRPC); puts go to it over a pipe. 100,000 pods as dicts and list bodies stay out of the agent's RSS, as a real
    API server's objects would."""

    def __init__(self, shape: Shape) -> None:
        context = multiprocessing.get_context("spawn")
        self._commands, child_end = context.Pipe()
        self._process = context.Process(target=_serve_fake, args=(shape, child_end), daemon=True)
        self._process.start()
        child_end.close()
        if not self._commands.poll(DEADLINE_S):
            self.stop()
            raise TimeoutError(f"the fake API server did not start within {DEADLINE_S} s")
        self.url: str = self._commands.recv()

    def put(self, plural: str, obj: dict[str, Any]) -> None:
        self._commands.send((plural, obj))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._commands.send(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _serve_fake(shape: Shape, commands: Connection) -> None:
    asyncio.run(_serve_fake_until_told(shape, commands))


async def _serve_fake_until_told(shape: Shape, commands: Connection) -> None:
    fake = FakeApiServer()
    _populate(fake, shape)
    commands.send(await fake.start())
    loop = asyncio.get_running_loop()
    while (command := await loop.run_in_executor(None, _receive, commands)) is not None:
        fake.put(*command)
    await fake.stop()


def _receive(commands: Connection) -> tuple[str, dict[str, Any]] | None:
    try:
        command: tuple[str, dict[str, Any]] | None = commands.recv()
    except EOFError:  # the benchmark went away
        return None
    return command


@contextlib.asynccontextmanager
async def _served_cluster(
    shape: Shape, ports: dict[str, int]
) -> AsyncIterator[tuple[FakeInChild, _Pipeline, EnvoyProcess]]:
    """The cluster in the fake API server, the agent's pipeline reading it, a real Envoy ACKing its output."""
    fake = await asyncio.to_thread(FakeInChild, shape)
    url = fake.url
    interfaces = {_pod_ip(i): f"lxc{i}" for i in range(min(shape.pods, shape.local))}
    source = KubernetesSource(
        KubernetesConfig(node_name=NODE_NAME, api_server=url),
        lambda ips: {ip: interfaces[ip] for ip in ips if ip in interfaces},
    )
    with tempfile.TemporaryDirectory(prefix="sidecarless-bench-") as directory:
        run_dir = Path(directory)
        ads = AdsServer()
        server = await start_server(ads, str(run_dir / "xds.sock"))
        envoy = EnvoyProcess(run_dir, "sidecarless~bench", run_dir / "xds.sock")
        envoy_task = asyncio.create_task(envoy.run())
        pipeline = _Pipeline(source, ads, ports)
        pipeline_task: asyncio.Task[None] | None = None
        try:
            await _until(lambda: ads.acks.connected, "Envoy connected")  # Envoy's start is not the control plane's
            pipeline_task = asyncio.create_task(pipeline.run())
            await _until(lambda: _enforced(ads, pipeline.snapshot), "the first configuration ACKed")
            yield fake, pipeline, envoy
        finally:
            with sigterm_ignored():
                for task in (pipeline_task, envoy_task):
                    if task is not None:
                        task.cancel()
                await asyncio.gather(*(t for t in (pipeline_task, envoy_task) if t is not None), return_exceptions=True)
                await asyncio.to_thread(stop_envoy, run_dir)
                await server.stop(grace=None)
                await asyncio.to_thread(fake.stop)


async def measure(shape: Shape, changes: int) -> Run:
    """Compile and render timed alone; then the cluster served by the fake API server, and each change put
    there: from the watch event to Envoy's ACK, through the Kubernetes source as the agent runs it."""
    heap.thaw()
    policies, pods = synthetic_shape(shape)
    node = Node(ips=(NODE_IP,))
    started = time.perf_counter()
    plan = compile_plan(policies, pods, node)
    compile_ms = (time.perf_counter() - started) * 1000
    ports = {INGRESS: _free_port(), EGRESS: _free_port()}
    started = time.perf_counter()
    snapshot = Snapshot.from_resources(render(plan, ports, listen_address="127.0.0.1"))
    render_ms = (time.perf_counter() - started) * 1000
    size = sum(len(r.body.value) for by_name in snapshot.resources.values() for r in by_name.values())
    del plan, snapshot, policies, pods

    policy_count = shape.policies
    async with _served_cluster(shape, ports) as (fake, pipeline, envoy):
        send_to_ack_ms = (time.perf_counter() - pipeline.published_at) * 1000
        # The agent writes each policy's status once (ok); let that settle before timing changes.
        await _until(lambda: pipeline.source.status_patches >= policy_count, "policy statuses written")
        samples = []
        first_change = len(pipeline.compile_ms)
        for change in range(1, changes + 1):
            published = pipeline.published
            started = time.perf_counter()
            fake.put("ciliumnetworkpolicies", policy_object(0, change, shape))  # the watch event goes out now
            await _until(partial(_changed_and_enforced, pipeline, published), "change ACKed")
            samples.append((time.perf_counter() - started) * 1000)
        change_compile_ms, change_render_ms = pipeline.compile_ms[first_change:], pipeline.render_ms[first_change:]
        envoy_rss = memory_mib(envoy.pid)[0] if envoy.pid else 0.0
        agent_rss = memory_mib(os.getpid())[0]
    ordered = sorted(samples)
    return Run(
        rules=shape.rules,
        endpoints=shape.pods,
        policies=shape.policies,
        local_endpoints=min(shape.pods, shape.local),
        compile_ms=round(compile_ms, 2),
        render_ms=round(render_ms, 2),
        bytes=size,
        send_to_ack_ms=round(send_to_ack_ms, 2),
        change_to_enforced_p50_ms=round(statistics.median(ordered), 2),
        change_to_enforced_p99_ms=round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        change_compile_p50_ms=round(statistics.median(change_compile_ms), 2),
        change_render_p50_ms=round(statistics.median(change_render_ms), 2),
        agent_rss_mib=round(agent_rss, 1),
        envoy_rss_mib=round(envoy_rss, 1),
        change_samples_ms=tuple(round(s, 2) for s in samples),
    )


def run(smoke: bool, results_dir: Path, report: Callable[[str], None] = print) -> dict[str, Any]:
    cases = SMOKE if smoke else FULL
    changes = 5 if smoke else 50
    prefix_counts, repeats = ((1000,), 2) if smoke else (PREFIX_COUNTS, PREFIX_REPEATS)
    with sigterm_unwinds():
        runs = []
        for number, (rules, endpoints) in enumerate(cases, 1):
            report(f"case {number} of {len(cases)}: {rules:,} rules over {endpoints:,} pods, {changes} changes")
            runs.append(asyncio.run(measure(Shape.grid(rules, endpoints), changes)))
        scale = SMOKE_SCALE if smoke else SCALE
        report(f"scale: {scale.policies:,} policies ({scale.rules:,} HTTP rules) over {scale.pods:,} pods, "
               f"{scale.local:,} on this node, {changes} changes")  # fmt: skip
        scale_run = asyncio.run(measure(scale, changes))
        prefix_runs = []
        for count in prefix_counts:
            report(f"a rule of {count:,} prefixes, {repeats} times")
            prefix_runs.append(asyncio.run(measure_prefixes(count, repeats)))
    results = {
        "runs": [asdict(r) for r in runs],
        "prefix_runs": [asdict(r) for r in prefix_runs],
        "scale": {**asdict(scale_run), "shape": asdict(scale)},
    }
    return write_result("control-plane", smoke, {"sidecarless": __version__}, results, results_dir)
