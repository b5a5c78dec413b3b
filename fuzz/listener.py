"""Fuzz the submission listener for as long as you like.

    python fuzz/listener.py --examples 20000

Starts `relay serve` with a trusted plain listener on a loopback port and drives the same
hypothesis strategy as the test suite; stops at the first input after which a normal
client is not served, or the daemon dies, and prints that input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from relay.passwords import hash_password  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.fuzzing import healthy, inputs, send  # noqa: E402
from tests.relayproc import PASSWORD, RelayProcess, base_config, free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    dns = DnsServer().start()
    dns.add("example.org", "A", "127.0.0.9")
    workdir = Path(tempfile.mkdtemp(prefix="relay-fuzz-"))
    plain = free_port()
    relay = RelayProcess(
        workdir,
        base_config(
            workdir,
            dns.port,
            free_port(),
            hash_password(PASSWORD),
            listeners=[
                {
                    "name": "local",
                    "address": "127.0.0.1",
                    "port": plain,
                    "tls": "none",
                    "auth": "none",
                    "trusted_networks": ["127.0.0.0/8"],
                }
            ],
            limits={
                "max_message_size": "64KiB",
                "idle_timeout": "3s",
                "max_connections_per_ip": 100000,
            },
        ),
    ).start()
    count = [0, 0]
    started = time.monotonic()

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def fuzz(data: bytes) -> None:
        count[0] += 1
        count[1] += len(data)
        send(plain, data, timeout=0.5)
        assert relay.proc.poll() is None, "the daemon died"
        assert healthy(plain), "not serving"

    try:
        fuzz()
    finally:
        relay.stop()
        dns.stop()
    print(
        f"fuzz: {count[0]} inputs, {count[1]} bytes in {time.monotonic() - started:.0f}s; "
        f"served after every one; tracebacks in the log: {relay.log().count('Traceback')}"
    )


if __name__ == "__main__":
    main()
