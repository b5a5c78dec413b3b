"""Shaping, measured: rate accuracy and the isolation of a healthy destination.

    python bench/shaping.py [--seconds 60]

Rates: a provider at `rate: 300/min`, one at `connection_rate: 120/min` (one message per
connection), and one mailbox at `recipient_rate: 60/min`, each fed more than it may send;
the rate measured at the destination over the window, as a ratio to the configured one.

Isolation: the time to deliver 200 messages to a healthy destination, first alone, then
beside a black-holed destination (accepts TCP, never greets) and one refusing connections,
each holding 500 recipients; the ratio is the slowdown the dead ones cause.

Everything runs on 127.0.0.0/8 with the test suite's DNS server and recording MX servers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.passwords import hash_password  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.mxserver import Blackhole, MxFarm  # noqa: E402
from tests.relayproc import PASSWORD, RelayProcess, base_config, free_port, make_message  # noqa: E402


def submit(relay: RelayProcess, recipients_of, count: int, threads: int = 4) -> None:  # type: ignore[no-untyped-def]
    def worker(offset: int) -> None:
        with relay.client() as smtp:
            for i in range(offset, count, threads):
                smtp.sendmail("app@example.org", recipients_of(i), make_message(f"b{i}"))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def measured_rate(times: list[float], window: float) -> float:
    """Events per second over the first `window` seconds after the first event."""
    start = times[0]
    inside = [t for t in times if t - start <= window]
    return (len(inside) - 1) / (inside[-1] - start)


def rates(args: argparse.Namespace, secret: str) -> None:
    dns, farm = DnsServer().start(), MxFarm(free_port())
    dns.add("example.org", "A", "127.0.0.9")  # the senders' domain must be routable
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    try:
        cases = [  # (label, domain, ip, shaping, configured per second, recipients_of)
            (
                "rate 300/min",
                "paced.test",
                "127.0.0.40",
                {"rate": "300/min"},
                5.0,
                lambda i: [f"u{i}@paced.test"],
            ),
            (
                "connection_rate 120/min",
                "conn.test",
                "127.0.0.41",
                {"connection_rate": "120/min", "max_messages_per_connection": 1},
                2.0,
                lambda i: [f"u{i}@conn.test"],
            ),
            (
                "recipient_rate 60/min",
                "mailbox.test",
                "127.0.0.42",
                {"recipient_rate": "60/min"},
                1.0,
                lambda i: ["same@mailbox.test"],
            ),
        ]
        providers = {}
        servers = {}
        for label, domain, ip, shaping, _, _ in cases:
            dns.mx(domain, (10, f"mx.{domain}"))
            dns.add(f"mx.{domain}", "A", ip)
            servers[label] = farm.server(ip)
            providers[domain.split(".")[0]] = {"domains": [domain], **shaping}
        relay = RelayProcess(
            workdir,
            base_config(
                workdir,
                dns.port,
                farm.port,
                secret,
                providers=providers,
                delivery={"port": farm.port, "idle_connection_timeout": "5s"},
            ),
        ).start()
        try:
            for _, _, _, _, per_second, recipients_of in cases:
                need = int(per_second * args.seconds * 1.2) + 2
                submit(relay, recipients_of, need)
            deadline = time.monotonic() + args.seconds * 1.5 + 30
            for label, _, _, _, per_second, _ in cases:
                server = servers[label]
                server.wait_for(
                    lambda s=server, p=per_second: len(s.messages) >= p * args.seconds,
                    timeout=max(1, deadline - time.monotonic()),
                )
                times = sorted(m.time for m in server.messages)
                got = measured_rate(times, args.seconds)
                print(
                    f"{label:26s} configured {per_second:6.2f}/s  measured {got:6.3f}/s  "
                    f"ratio {got / per_second:5.3f}  ({len(times)} messages)"
                )
        finally:
            relay.stop()
    finally:
        dns.stop()
        farm.stop()


def isolation(args: argparse.Namespace, secret: str) -> None:
    results = []
    for with_dead in (False, True):
        dns, farm = DnsServer().start(), MxFarm(free_port())
        dns.add("example.org", "A", "127.0.0.9")
        workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        try:
            for domain, ip in (
                ("healthy.test", "127.0.0.50"),
                ("blackhole.test", "127.0.0.51"),
                ("refused.test", "127.0.0.52"),
            ):
                dns.mx(domain, (10, f"mx.{domain}"))
                dns.add(f"mx.{domain}", "A", ip)
            healthy = farm.server("127.0.0.50")
            Blackhole(farm, "127.0.0.51")
            relay = RelayProcess(
                workdir,
                base_config(
                    workdir,
                    dns.port,
                    farm.port,
                    secret,
                    delivery={
                        "port": farm.port,
                        "connect_timeout": "30s",
                        "greeting_timeout": "30s",
                    },
                    retry={"initial": "1m", "max": "5m"},
                ),
            ).start()
            try:
                if with_dead:
                    submit(relay, lambda i: [f"u{i}-{j}@blackhole.test" for j in range(10)], 50)
                    submit(relay, lambda i: [f"u{i}-{j}@refused.test" for j in range(10)], 50)
                start = time.monotonic()
                submit(relay, lambda i: [f"ok{i}@healthy.test"], args.healthy)
                healthy.wait_messages(args.healthy, timeout=120)
                results.append(max(m.time for m in healthy.messages) - start)
            finally:
                relay.stop()
        finally:
            dns.stop()
            farm.stop()
    alone, beside = results
    print(f"{'isolation: healthy alone':26s} {args.healthy} messages in {alone:6.2f}s")
    print(
        f"{'isolation: beside dead':26s} {args.healthy} messages in {beside:6.2f}s  "
        f"ratio {beside / alone:5.2f}  (1,000 recipients on dead destinations)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="rate window")
    parser.add_argument("--healthy", type=int, default=200)
    args = parser.parse_args()
    secret = hash_password(PASSWORD)
    rates(args, secret)
    isolation(args, secret)


if __name__ == "__main__":
    main()
