"""Helpers that several test modules share: routing a test domain, submitting in
parallel, reading the daemon's metrics, and waiting (bounded) on its observable state.
Fixtures stay in conftest.py."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.dnsserver import DnsServer
from tests.relayproc import RelayProcess, make_message


def route(dns_server: DnsServer, domain: str, ip: str) -> None:
    """`domain` gets one MX, mx.`domain`, at `ip`."""
    dns_server.mx(domain, (10, f"mx.{domain}"))
    dns_server.add(f"mx.{domain}", "A", ip)


def submit_many(
    relay: RelayProcess,
    recipients_of: Callable[[int], list[str]],
    count: int,
    threads: int = 4,
    headers: str = "",
) -> None:
    """Submit `count` messages over `threads` parallel sessions; recipients_of(i) → list."""

    def worker(offset: int) -> None:
        with relay.client() as smtp:
            for i in range(offset, count, threads):
                smtp.sendmail(
                    "app@example.org", recipients_of(i), make_message(f"m{i}", headers=headers)
                )

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)


def scrape(relay: RelayProcess) -> dict[str, dict[tuple, float]]:
    """name → {labels: value} from the daemon's /metrics, parsed by prometheus-client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def depth(
    relay: RelayProcess, provider: str, state: str, class_name: str = "transactional"
) -> float:
    key = (("class", class_name), ("provider", provider), ("state", state))
    return scrape(relay)["relay_queue_depth"].get(key, 0.0)


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> bool:
    """Bounded wait on the daemon's observable state (its API answers, not a sleep guess)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def listener_pid(relay: RelayProcess) -> int | None:
    """The daemon's listener process (relay/listener/worker.py), if one runs now."""
    assert relay.proc is not None
    pid = relay.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) <= 1, children
    return int(children[0]) if children else None
