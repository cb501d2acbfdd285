"""Hostile but valid input never stops enforcement (issue 12): a policy set that would overflow a kernel map is
rejected whole before the kernel is touched, an alias bomb is refused at once, 8,000 prefixes compile while
the agent API keeps answering; the agent never exits, and the next good policy set is enforced."""

import threading
import time
from pathlib import Path

from sidecarless.api.client import AgentUnreachable, agent_status
from sidecarless.lab.node import Lab
from tests.e2e.conftest import BILLING, billing, status_code, wait_until, write_policy
from tests.hostile_inputs import ALIAS_BOMB, many_prefixes, too_many_entries

GOOD = (BILLING / "policies" / "billing-api.yaml").read_text()


def enforced_as_billing(lab: Lab) -> None:
    assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"


def test_an_overflowing_policy_set_is_rejected_whole_and_the_next_good_one_enforced(tmp_path: Path) -> None:
    with billing("overflow") as lab:
        pid = lab.agent_pid()
        directory = tmp_path / "too-big"
        write_policy(directory, "billing-api.yaml", GOOD)
        write_policy(directory, "too-big.yaml", too_many_entries())
        lab._install_policies(directory)
        wait_until(lambda: agent_status(lab.agent_socket)["apply_error"] is not None, "the rejection", 30)
        status = agent_status(lab.agent_socket)
        error = status["apply_error"]
        assert error["stage"] == "capacity"
        assert error["error"] == (
            # the billing policy's two entries and the 302,400 of the big one
            "map scl_policy holds 262,144 entries (--bpf-policy-map-max) and would need 302,402: pod "
            "production/billing-api needs 302,402, 302,400 of them for policy production/too-big "
            f"({lab.policies_dir}/too-big.yaml:1)"
        )
        # Nothing of it reached the kernel; the last good policy set is in force, and the agent did not exit.
        assert status["datapath"]["maps"]["scl_policy"]["entries"] < 100
        assert status["policies"]["in_force"] == ["production/billing-api-l7-policy"]
        assert lab.agent_pid() == pid
        enforced_as_billing(lab)
        # The overflow removed, and a change that tightens the policy: both applied.
        write_policy(tmp_path / "next", "billing-api.yaml", GOOD.replace("method: GET", "method: HEAD"))
        assert lab.apply(tmp_path / "next") == []
        assert status_code(lab, "prometheus", "GET", "/metrics") == "403"
        assert agent_status(lab.agent_socket)["apply_error"] is None
        assert lab.agent_pid() == pid


def test_an_alias_bomb_is_rejected_within_a_second_and_8000_prefixes_leave_the_api_answering(
    tmp_path: Path,
) -> None:
    with billing("input") as lab:
        pid = lab.agent_pid()
        directory = tmp_path / "bomb"
        write_policy(directory, "billing-api.yaml", GOOD)
        write_policy(directory, "bomb.yaml", ALIAS_BOMB)
        started = time.monotonic()
        lab._install_policies(directory)
        target = str(lab.policies_dir / "bomb.yaml")
        wait_until(lambda: target in agent_status(lab.agent_socket)["policies"]["rejected"], "the bomb's rejection")
        assert time.monotonic() - started < 1.0
        assert "aliases expand to more values" in agent_status(lab.agent_socket)["policies"]["rejected"][target][0]
        enforced_as_billing(lab)

        # 8,000 prefixes: the API answers every status request within a second while the agent compiles.
        latencies: list[float] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                asked = time.monotonic()
                try:
                    agent_status(lab.agent_socket)
                except AgentUnreachable:
                    latencies.append(float("inf"))
                    continue
                latencies.append(time.monotonic() - asked)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            directory = tmp_path / "many"
            write_policy(directory, "billing-api.yaml", GOOD)
            write_policy(directory, "many.yaml", many_prefixes(8000))
            assert lab.apply(directory, timeout_s=30) == []
        finally:
            stop.set()
            poller.join()
        assert latencies and max(latencies) < 1.0, f"slowest status: {max(latencies):.2f} s of {len(latencies)}"
        assert agent_status(lab.agent_socket)["datapath"]["maps"]["scl_ipcache"]["entries"] >= 8000
        enforced_as_billing(lab)
        assert lab.agent_pid() == pid
