"""Every Prometheus metric relay exports (SPEC §8), defined in one place.

Counters and the histogram are updated where things happen. The gauges that describe
state (queue depth, oldest age, suspensions, spool) are computed at scrape time from
the exact figures the queue keeps, so they cannot drift from the truth. Label values
stay bounded by the configuration: `provider` is a configured name or `default`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.queue.models import Where
from relay.queue.stats import QueueStats
from relay.routing.router import Queue
from relay.shaping.shaper import Limit, configured_limits

STATES = ("ready", "active", "deferred", "held")
_STATE = {
    Where.ROUTING: "ready",
    Where.SCHEDULED: "deferred",
    Where.READY: "ready",
    Where.ACTIVE: "active",
    Where.HELD: "held",
}
REJECT_REASONS = (
    "auth",
    "sender",
    "rate",
    "size",
    "recipients",
    "storage",
    "syntax",
    "dkim",
    "guard",
)


class LaneView(Protocol):
    queue: Queue

    def limits(self) -> list[Limit]: ...

    @property
    def suspended(self) -> str | None: ...

    @property
    def paused(self) -> bool: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "relay_messages_received",
            "Messages accepted (250) from clients",
            ["account", "class"],
            registry=r,
        )
        self.rejected = Counter(
            "relay_messages_rejected", "Submissions refused, by reason", ["reason"], registry=r
        )
        self.deliveries = Counter(
            "relay_deliveries",
            "Recipient outcomes of delivery attempts",
            ["provider", "class", "outcome", "egress"],
            registry=r,
        )
        self.replies = Counter(
            "relay_smtp_replies",
            "Replies received from destinations",
            ["provider", "code", "egress"],
            registry=r,
        )
        self.delay = Histogram(
            "relay_delivery_delay_seconds",
            "Receipt to final outcome, per recipient",
            ["provider", "class"],
            registry=r,
            buckets=(0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400),
        )
        self.connections = Gauge(
            "relay_connections_open",
            "Open outbound connections",
            ["provider", "egress"],
            registry=r,
        )
        self.auth_failures = Counter("relay_auth_failures", "Failed AUTH attempts", registry=r)
        self.dkim_signatures = Counter(
            "relay_dkim_signatures",
            "DKIM signatures made at acceptance",
            ["domain", "result"],
            registry=r,
        )
        self.tls_policy = Counter(
            "relay_tls_policy",
            "Outbound sessions by the TLS policy that applied and what came of it",
            ["provider", "policy", "result"],
            registry=r,
        )
        self.admission_refused = Counter(
            "relay_admission_refused",
            "RCPTs refused (452 4.3.1) because the class's backlog for the provider is full",
            ["provider", "class"],
            registry=r,
        )
        self.reload_success = Gauge(
            "relay_config_reload_success",
            "1 if the last configuration (re)load succeeded",
            registry=r,
        )
        self.reload_success.set(1)
        self.guard_tripped = Gauge(
            "relay_account_guard_tripped",
            "1 while the account guard holds the account's mail (relay account list)",
            ["account"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def cluster(self) -> tuple[Gauge, Gauge]:
        """relay_cluster_redis_up and relay_cluster_nodes, registered only with `cluster`
        (SPEC §8): a single node exports no series about a Redis it does not have."""
        redis_up = Gauge(
            "relay_cluster_redis_up", "1 while the cluster's Redis answers", registry=self.registry
        )
        nodes = Gauge(
            "relay_cluster_nodes", "Live nodes seen in Redis (heartbeats)", registry=self.registry
        )
        return redis_up, nodes

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)


class StateCollector(Collector):
    """Queue depth, oldest age, suspensions and spool size, read at scrape time."""

    def __init__(
        self,
        stats: QueueStats,
        lanes: Callable[[], Iterable[LaneView]],
        providers: Callable[[], list[str]],
        classes: Callable[[], list[str]],
        spool: Callable[[], tuple[int, int, int]],
        routes: Callable[[], int],
        egress: Callable[[], list[str]],
        provider_queues: Callable[[], list[Queue]] = list,
    ) -> None:
        """`provider_queues`: every configured provider's queues, lanes running or not."""
        self._egress = egress
        self._provider_queues = provider_queues
        self._stats = stats
        self._lanes = lanes
        self._providers = providers
        self._classes = classes
        self._spool = spool
        self._routes = routes

    def collect(self) -> Iterable[Metric]:
        paused = set()
        # `default` is 1 when any domain without a provider is suspended; per source, as
        # receivers suspend a sending IP (SPEC §14)
        suspended: dict[tuple[str, str], int] = {
            (name, egress): 0
            for name in [*self._providers(), "default"]
            for egress in self._egress()
        }
        for lane in self._lanes():
            key, provider = lane.queue.key, lane.queue.provider
            if lane.paused:
                paused.add(key)
            if lane.suspended is not None:
                suspended[(provider, lane.queue.egress)] = 1
        depth: dict[tuple[str, str, str], int] = defaultdict(int)
        for provider in [*self._providers(), "default"]:
            for class_name in self._classes():
                for state in STATES:
                    depth[(provider, class_name, state)] = 0
        # Every queued recipient is counted in exactly one place: the states add up.
        for (queue, provider, class_name, where), count in list(self._stats.counts.items()):
            state = _STATE[where]
            if where is Where.READY and queue in paused:
                state = "deferred"
            depth[(provider, class_name, state)] += count
        family = GaugeMetricFamily(
            "relay_queue_depth", "Recipients waiting", labels=["provider", "class", "state"]
        )
        for labels, value in sorted(depth.items()):
            family.add_metric(list(labels), value)
        yield family
        oldest = GaugeMetricFamily(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest message waiting in the queue",
            labels=["provider", "class"],
        )
        ages = {(provider, class_name): 0.0 for provider, class_name, _ in depth}
        ages.update(self._stats.oldest_ages(time.time()))
        for (provider, class_name), age in sorted(ages.items()):
            oldest.add_metric([provider, class_name], age)
        yield oldest
        family = GaugeMetricFamily(
            "relay_provider_suspended",
            "1 while a provider is suspended",
            labels=["provider", "egress"],
        )
        for (provider, egress), value in sorted(suspended.items()):
            family.add_metric([provider, egress], value)
        yield family
        yield self._limits()
        yield GaugeMetricFamily(
            "relay_routing_cache_entries", "Domains whose route is cached", value=self._routes()
        )
        messages, size, quarantined = self._spool()
        yield GaugeMetricFamily("relay_spool_messages", "Messages in the spool", value=messages)
        yield GaugeMetricFamily("relay_spool_bytes", "Bytes of messages in the spool", value=size)
        yield CounterMetricFamily(
            "relay_spool_quarantined",
            "Damaged spool entries moved aside at startup",
            value=quarantined,
        )

    def _limits(self) -> Metric:
        """Per provider queue: configured limits, or those of its lane while it runs
        (adaptive, throttled, slow start). Site lanes are many and short-lived; their
        limits are the defaults'."""
        limits = {
            (queue.provider, queue.egress): configured_limits(queue.shaping)
            for queue in self._provider_queues()
        }
        for lane in self._lanes():
            if lane.queue.provider != "default":
                limits[(lane.queue.provider, lane.queue.egress)] = lane.limits()
        family = GaugeMetricFamily(
            "relay_provider_limit",
            "The limit in force now: max_connections, or rate in messages per second",
            labels=["provider", "egress", "limit"],
        )
        for (provider, egress), values in sorted(limits.items()):
            for limit in values:
                value = limit.value
                if isinstance(value, int):
                    family.add_metric([provider, egress, limit.name], value)
                elif value is not None:
                    family.add_metric([provider, egress, limit.name], value.per_second)
        return family
