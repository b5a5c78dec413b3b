"""Admission control's bookkeeping in one event loop: reservations, their hand-over to
queued messages, their release, and the listener side's wait with a timeout. Routing
uses real DNS over the wire (tests/dnsserver.py) where a lookup must really wait."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from relay.config import parse_config
from relay.config.model import Config
from relay.dns.resolver import Resolver
from relay.errors import ConfigError
from relay.listener.admission import TIMED_OUT, AdmissionClient
from relay.metrics import Metrics
from relay.queue.admission import Admission, Refused
from relay.queue.models import QueuedMessage, Where
from relay.queue.stats import QueueStats
from relay.routing.router import Router
from relay.spool.records import Envelope, EnvelopeRecipient
from tests.dnsserver import DnsServer


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()


def _config(dns_port: int, cap: int) -> Config:
    return parse_config(
        {
            "hostname": "relay.test",
            "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"},
            "providers": {"alpha": {"domains": ["alpha.test"], "route": "127.0.0.2:25"}},
            "classes": {"bulk": {"max_queued": cap}},
        }
    )


def _admission(dns: DnsServer, cap: int) -> tuple[Admission, QueueStats, Router, Metrics]:
    config = _config(dns.port, cap)
    router = Router(config, Resolver(config.dns))
    stats, metrics = QueueStats(), Metrics()
    return Admission(config, router, stats, metrics), stats, router, metrics


def _queue(stats: QueueStats, router: Router, message_id: str, count: int) -> QueuedMessage:
    """A bulk message for alpha.test, its recipients in the ready list."""
    recipients = tuple(EnvelopeRecipient(f"r{i}@alpha.test") for i in range(count))
    envelope = Envelope(message_id, "s@example.org", recipients, 0.0, 10, "bulk", "lists")
    message = QueuedMessage(envelope, 0)
    destination = router.cached("alpha.test")
    assert destination is not None
    for recipient in message.recipients:
        recipient.destination = destination
    stats.move(message, message.recipients, Where.READY)
    return message


def test_concurrent_requests_admit_exactly_the_cap(dns: DnsServer) -> None:
    """Forty RCPTs for one site at once, each waiting on its MX lookup: five get in."""
    dns.mx("one.test", (10, "mx.shared.test"))
    dns.mx("two.test", (10, "mx.shared.test"))
    dns.add("mx.shared.test", "A", "127.0.0.5")
    admission, _, _, _ = _admission(dns, cap=5)

    async def main() -> list[Refused | None]:
        return await asyncio.gather(
            *(admission.admit(i, i, "bulk", "one.test" if i % 2 else "two.test") for i in range(40))
        )

    answers = asyncio.run(main())
    assert answers.count(None) == 5
    refused = {answer for answer in answers if answer is not None}
    assert refused == {
        Refused("452 4.3.1 default:mx.shared.test backlog full, try again later", "default")
    }
    assert admission.reserved == {("default:mx.shared.test", "bulk"): 5}


def test_slots_pass_to_the_message_and_go_once_it_is_queued(dns: DnsServer) -> None:
    admission, stats, router, _ = _admission(dns, cap=3)

    async def main() -> None:
        assert [await admission.admit(r, 1, "bulk", "alpha.test") for r in (1, 2, 3)] == [None] * 3
        assert await admission.admit(4, 2, "bulk", "alpha.test") is not None
        admission.release(1, 3)  # one RCPT abandoned (its answer timed out)
        assert await admission.admit(5, 2, "bulk", "alpha.test") is None
        admission.release(2)  # the other transaction ends without a message
        admission.queued(1, "M1")  # two slots: held until the message is queued
        assert admission.reserved == {("alpha", "bulk"): 2}
        _queue(stats, router, "M1", 2)
        admission.accepted("M1")
        assert admission.reserved == {}
        assert stats.backlog == {("alpha", "bulk"): 2}
        assert await admission.admit(6, 3, "bulk", "alpha.test") is None
        assert await admission.admit(7, 3, "bulk", "alpha.test") is not None
        assert await admission.admit(8, 3, "transactional", "alpha.test") is None  # no cap

    asyncio.run(main())


def test_a_transaction_ending_during_the_lookup_takes_no_slot(dns: DnsServer) -> None:
    dns.mx("slow.test", (10, "mx.slow.test"))
    dns.add("mx.slow.test", "A", "127.0.0.6")
    admission, _, _, _ = _admission(dns, cap=1)

    async def main() -> None:
        ended = asyncio.ensure_future(admission.admit(1, 1, "bulk", "slow.test"))
        lost = asyncio.ensure_future(admission.admit(2, 2, "bulk", "slow.test"))
        await asyncio.sleep(0)  # both wait for DNS now
        admission.release(1)  # the client hung up
        admission.reset()  # the listener process is gone: request 2 with it
        assert await ended is None and await lost is None
        assert admission.reserved == {}
        assert await admission.admit(1, 1, "bulk", "slow.test") is None  # a new process

    asyncio.run(main())


def test_a_domain_dns_cannot_route_is_admitted_uncounted(dns: DnsServer) -> None:
    dns.servfail("broken.test")
    admission, _, _, _ = _admission(dns, cap=1)

    async def main() -> None:
        for request in (1, 2, 3):
            assert await admission.admit(request, 1, "bulk", "broken.test") is None
        assert admission.reserved == {}

    asyncio.run(main())


def test_refusals_are_counted_as_clients_are_told(dns: DnsServer) -> None:
    admission, _, _, metrics = _admission(dns, cap=1)
    admission.refused("alpha", "bulk")
    value = metrics.registry.get_sample_value(
        "relay_admission_refused_total", {"provider": "alpha", "class": "bulk"}
    )
    assert value == 1
    zero = metrics.registry.get_sample_value(
        "relay_admission_refused_total", {"provider": "default", "class": "bulk"}
    )
    assert zero == 0  # every capped class's series exists from the start


class _Wire:
    """The listener's end of the socketpair: the frames it wrote."""

    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []

    def write(self, data: bytes) -> None:
        self.frames.append(pickle.loads(data[4:]))


def test_the_listener_waits_for_its_answer_and_reports_a_refusal() -> None:
    wire = _Wire()
    client = AdmissionClient(wire, timeout=5)  # type: ignore[arg-type]

    async def main() -> None:
        ticket = client.ticket()
        asking = asyncio.ensure_future(client.admit(ticket, "bulk", "alpha.test"))
        await asyncio.sleep(0)
        kind, request, asked, class_name, domain = wire.frames[-1]
        assert (kind, asked, class_name, domain) == ("admit", ticket, "bulk", "alpha.test")
        client.answered(request, Refused("452 4.3.1 alpha backlog full, try again later", "alpha"))
        assert await asking == "452 4.3.1 alpha backlog full, try again later"
        assert wire.frames[-1] == ("admit_refused", "alpha", "bulk")
        client.release(ticket)
        assert wire.frames[-1] == ("admit_release", ticket, None)
        client.release(client.ticket())  # a ticket that never asked sends nothing
        assert wire.frames[-1] == ("admit_release", ticket, None)

    asyncio.run(main())


def test_a_main_process_that_does_not_answer_gets_451() -> None:
    wire = _Wire()
    client = AdmissionClient(wire, timeout=0.05)  # type: ignore[arg-type]

    async def main() -> None:
        ticket = client.ticket()
        assert await client.admit(ticket, "bulk", "alpha.test") == TIMED_OUT
        request = wire.frames[0][1]
        assert wire.frames[-1] == ("admit_release", ticket, request)  # a late slot is freed
        client.answered(request, None)  # the late answer finds nobody waiting

    asyncio.run(main())
    assert TIMED_OUT.startswith("451 4.3.0 ")


@pytest.mark.parametrize("value", [0, -5, "1000", 2.5, True])
def test_max_queued_must_be_a_positive_whole_number(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"hostname": "relay.test", "classes": {"bulk": {"max_queued": value}}})
    assert any(p.startswith("classes.bulk.max_queued: expected") for p in caught.value.problems)


def test_only_a_class_given_max_queued_is_capped(dns: DnsServer) -> None:
    config = _config(dns.port, cap=1000)
    assert config.classes["bulk"].max_queued == 1000
    assert config.classes["transactional"].max_queued is None
