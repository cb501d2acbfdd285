"""Hit counts per rule (`policy hits`): flows from the kernel's counters (one per set of rule items that decides
an entry), forwarded requests from Envoy's (by the HTTP rule that matched, its shadow rules say which), denied
requests from its access log (on the rule items none of whose HTTP rules matched).

Totals are kept per rule position ("shop/cart spec.ingress[0].toPorts[0].rules.http[1]"): a policy change keeps
the counts of every position it keeps. They are saved in the run directory after each collection, with what
was last read of each counter, so a restarted agent goes on from there (the kernel's counters are pinned, the
adopted Envoy's go on counting)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sidecarless.observe.logs import LogKey
from sidecarless.policy.model import Policy, rule_positions
from sidecarless.policy.plan import Plan
from sidecarless.redirect.bpf import BpfDatapath
from sidecarless.redirect.maps import assign_hit_indexes

log = logging.getLogger(__name__)

FORWARDED_DETAILS = "via_upstream"  # Envoy's response code details of a request the backend answered
EnvoyCounterKey = tuple[str, str, str, str]  # chain label, egress rule, ingress rule, response code details


@dataclass
class RuleCounts:
    flows_allowed: int = 0
    flows_denied: int = 0
    requests_allowed: int = 0
    requests_denied: int = 0
    last_hit: float | None = None  # seconds since the epoch


class RuleHits:
    """Used from the event loop and from threads (the datapath reconcile): one lock around its state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._assigned_for: Plan | None = None
        self._generation = 0  # counted up whenever indexes change hands
        self.since = time.time()  # counting since
        self.totals: dict[str, RuleCounts] = {}
        self.indexes: dict[tuple[str, ...], int] = {}  # rule items -> kernel counter index
        self._kernel_seen: dict[int, tuple[int, int]] = {}
        self._envoy_seen: dict[EnvoyCounterKey, int] = {}
        self._load()

    def assign(self, plan: Plan, datapath: BpfDatapath) -> dict[tuple[str, ...], int]:
        """Counter indexes for the plan's entries; what the old ones counted is collected first, and an index
        given to other rule items starts from zero. Worked out once per plan."""
        with self._lock:
            if plan is self._assigned_for:
                return self.indexes
            indexes = assign_hit_indexes(plan, self.indexes)
            # Only the counters given up are read here (a policy change must not wait for every counter).
            freed = {
                index: origins for origins, index in self.indexes.items() if index and indexes.get(origins) != index
            }
            self._add_kernel(freed, datapath.hit_counts(freed), time.time())
            fresh = [index for origins, index in indexes.items() if index and self.indexes.get(origins) != index]
            datapath.reset_hits(fresh)
            self._kernel_seen.update({index: (0, 0) for index in fresh})
            self.indexes, self._assigned_for = indexes, plan
            self._generation += 1
            return indexes

    def collect_kernel(self, datapath: BpfDatapath) -> None:
        """Every counter: read without the lock (65,536 of them take a while, and a policy change must not wait),
        counted only if no index changed hands meanwhile (the next collection reads them again)."""
        with self._lock:
            by_index = {index: origins for origins, index in self.indexes.items() if index}
            generation = self._generation
        counts = datapath.hit_counts(by_index)
        with self._lock:
            if generation == self._generation:
                self._add_kernel(by_index, counts, time.time())

    def _add_kernel(self, by_index: dict[int, tuple[str, ...]], counts: dict[int, tuple[int, int]], now: float) -> None:
        for index, (allowed, denied) in counts.items():
            seen_allowed, seen_denied = self._kernel_seen.get(index, (0, 0))
            new_allowed, new_denied = _delta(allowed, seen_allowed), _delta(denied, seen_denied)
            self._kernel_seen[index] = (allowed, denied)
            for origin in by_index[index]:
                if new_allowed or new_denied:
                    rule = self._counts(origin, now)
                    rule.flows_allowed += new_allowed
                    rule.flows_denied += new_denied

    def collect_envoy(self, counters: Mapping[EnvoyCounterKey, int], rules: Mapping[tuple[str, str, str], str]) -> None:
        """`counters`: Envoy's hit counters; `rules`: what their rule names stand for (xds.render.hit_rules)."""
        now = time.time()
        with self._lock:
            self._add_envoy(counters, rules, now)

    def _add_envoy(
        self, counters: Mapping[EnvoyCounterKey, int], rules: Mapping[tuple[str, str, str], str], now: float
    ) -> None:
        for key, value in counters.items():
            new = _delta(value, self._envoy_seen.get(key, 0))
            self._envoy_seen[key] = value
            chain, egress, ingress, details = key
            if not new or details != FORWARDED_DETAILS:
                continue  # denials are counted from the access log, on the rule items that denied
            for group, name in (("egress", egress), ("ingress", ingress)):
                origin = rules.get((chain, group, name))
                if origin:
                    self._counts(origin, now).requests_allowed += new

    def request_denied(self, origins: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            for origin in origins:
                self._counts(origin, now).requests_denied += 1

    def _counts(self, origin: str, now: float) -> RuleCounts:
        counts = self.totals.setdefault(origin, RuleCounts())
        counts.last_hit = now
        return counts

    def rows(self, policies: Iterable[Policy]) -> list[dict[str, Any]]:
        """Every rule of every policy, with its counts (zero for a rule nothing hit)."""
        with self._lock:
            return self._rows(policies)

    def _rows(self, policies: Iterable[Policy]) -> list[dict[str, Any]]:
        rows = []
        for policy in policies:
            for position, http in rule_positions(policy):
                counts = self.totals.get(position, RuleCounts())
                rows.append(
                    {
                        "policy": policy.key,
                        "rule": position.split(" ", 1)[1],
                        "http": http,
                        "audit": policy.audit,
                        **asdict(counts),
                    }
                )
        return rows

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        state = {
            "since": self.since,
            "totals": {origin: asdict(counts) for origin, counts in self.totals.items()},
            "indexes": [[list(origins), index] for origins, index in self.indexes.items()],
            "kernel_seen": [[index, list(seen)] for index, seen in self._kernel_seen.items()],
            "envoy_seen": [[list(key), value] for key, value in self._envoy_seen.items()],
        }
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.path)

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            self.since = float(state["since"])
            self.totals = {origin: RuleCounts(**counts) for origin, counts in state["totals"].items()}
            self.indexes = {tuple(origins): int(index) for origins, index in state["indexes"]}
            self._kernel_seen = {int(index): (int(seen[0]), int(seen[1])) for index, seen in state["kernel_seen"]}
            self._envoy_seen = {(k[0], k[1], k[2], k[3]): int(value) for k, value in state["envoy_seen"]}
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, IndexError) as error:
            # A damaged file loses the counts so far, never the agent: counting starts again.
            log.warning("hit counts not read; counting from now", extra={LogKey.ERROR: f"{self.path}: {error}"})
            self.since, self.totals, self.indexes = time.time(), {}, {}
            self._kernel_seen, self._envoy_seen = {}, {}


def _delta(value: int, seen: int) -> int:
    """What a counter gained since it was last read; a counter that went back (a new Envoy) counted from 0."""
    return value - seen if value >= seen else value
