"""Replacing the real Envoy (issue 16): a second one on the same ports takes over once it holds the
configuration, the first drains and exits; a new Envoy, planned or after a crash, starts from the last good
configuration while the newest one is rejected. Traffic through a handover is tested in the lab
(tests/e2e/test_zero_drop.py); here, the processes and what each Envoy holds."""

import os
import signal

from sidecarless.envoy.admin import admin_get
from sidecarless.envoy.process import EnvoyProcess, listening_sockets, process_alive
from sidecarless.policy.model import HttpRule
from sidecarless.xds.resources import ROUTE_TYPE
from sidecarless.xds.server import AdsServer
from tests.envoy.conftest import DRAIN_TIME_S
from tests.envoy.test_envoy_xds import all_acked, snapshot_of, until


async def routes_held(process: EnvoyProcess) -> str:
    status, body = await admin_get(process.admin_socket, "/config_dump?resource=dynamic_route_configs")
    assert status == 200, body
    return body


async def test_a_handover_starts_the_new_envoy_then_drains_and_stops_the_old(
    envoy: tuple[AdsServer, EnvoyProcess, int], billing_policy_text: str
) -> None:
    ads, process, port = envoy
    snapshot = snapshot_of(billing_policy_text, port)
    await ads.publish(snapshot)
    await until(lambda: all_acked(ads, snapshot), "the first Envoy to ACK")
    old_pid, old_instance = process.pid, process.instance
    assert old_pid is not None and listening_sockets(old_pid)

    handover = await process.handover(ads.holds_whole_configuration, ads.drain)

    assert (handover.old_pid, handover.new_pid) == (old_pid, process.pid)
    assert process.instance != old_instance
    assert not process_alive(old_pid)
    # The old one closed its listeners only after the drain time; the new one had them all along.
    assert handover.drained_s >= DRAIN_TIME_S, handover
    assert listening_sockets(handover.new_pid)
    assert [state.instance for state in ads.streams] == [process.instance]
    assert all_acked(ads, snapshot)
    # The admin link follows the current Envoy.
    status, body = await admin_get(process.admin_socket, "/server_info")
    assert status == 200 and process.instance in body
    assert "/metrics" in await routes_held(process)
    # A later change reaches the new Envoy.
    changed = snapshot_of(billing_policy_text.replace("method: GET", "method: HEAD"), port)
    await ads.publish(changed)
    await until(lambda: all_acked(ads, changed), "the new Envoy to ACK a change")


async def test_a_new_envoy_starts_from_the_last_good_configuration_while_the_newest_is_rejected(
    envoy: tuple[AdsServer, EnvoyProcess, int], billing_policy_text: str
) -> None:
    """Planned (handover) and unplanned (a crash, the supervisor starts the next one) alike."""
    ads, process, port = envoy
    good = snapshot_of(billing_policy_text, port)
    await ads.publish(good)
    await until(lambda: all_acked(ads, good), "the good configuration to be ACKed")
    await ads.publish(snapshot_of(billing_policy_text, port, replace_rule=HttpRule("GET", "/metrics(")))
    await until(lambda: ROUTE_TYPE in ads.acks.rejected, "Envoy to NACK the route")

    await process.handover(ads.holds_whole_configuration, ads.drain)
    assert ads.acks.instance == process.instance
    assert ads.acks.accepted[ROUTE_TYPE] == good.digests(ROUTE_TYPE)
    held = await routes_held(process)
    assert "/metrics" in held and "/metrics(" not in held

    crashed = process.pid
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)
    await until(lambda: process.pid not in (None, crashed), "the supervisor to start the next Envoy")
    await until(
        lambda: ads.acks.instance == process.instance and ads.acks.synced, "the next Envoy to hold a configuration"
    )
    assert ads.acks.accepted[ROUTE_TYPE] == good.digests(ROUTE_TYPE)
    held = await routes_held(process)
    assert "/metrics" in held and "/metrics(" not in held
