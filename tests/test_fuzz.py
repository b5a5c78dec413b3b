"""Fuzz the listener over a real socket; after every input a normal client is served.

A short run in the suite; `python fuzz/listener.py --examples N` runs as long as you like.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.fuzzing import healthy, inputs, send
from tests.relayproc import free_port

EXAMPLES = 600


def test_listener_survives_fuzzed_input(relay_factory, dns_server):
    dns_server.add("example.test", "A", "127.0.0.2")
    plain = free_port()
    relay = relay_factory(
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
        limits={"max_message_size": "64KiB", "idle_timeout": "3s", "max_connections_per_ip": 1000},
    )
    tried = []

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(inputs)
    def fuzz(data: bytes) -> None:
        tried.append(len(data))
        send(plain, data, timeout=0.5)
        assert healthy(plain), f"not serving after {data[:200]!r}"
        assert relay.proc.poll() is None, "the daemon died"

    fuzz()
    assert len(tried) == EXAMPLES, f"only {len(tried)} inputs were tried"
    assert "Traceback" not in relay.log()
