"""Egress identities through `relay serve`: bulk leaves from its own address and name, a
provider's suspension of one source leaves the other flowing, limits are kept per source.
127.0.0.2 and 127.0.0.3 are distinct local sources on Linux."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from typing import Any

import yaml

from tests import providers as p
from tests.relayproc import PASSWORD, make_message
from tests.support import route, scrape, submit_many, wait_until

SOURCES = {
    "main": {"source_address": "127.0.0.2", "ehlo": "mail.example.org"},
    "lists": {"source_address": "127.0.0.3", "ehlo": "lists.example.org"},
}


def _config(password_hash: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "egress": SOURCES,
        "default_egress": "main",
        "classes": {"bulk": {"priority": 1, "detect": ["list-id"], "egress": "lists"}},
        "accounts": [
            {"name": "app", "password": password_hash, "senders": ["*@example.org"]},
            {
                "name": "pinned",
                "password": password_hash,
                "senders": ["*@example.org"],
                "class": "bulk",
                "egress": "main",  # over its class
            },
        ],
        "providers": {
            "orange": {
                "domains": ["orange.test"],
                "max_connections": 2,
                "max_messages_per_connection": 3,
                "rules": [{"match": "ofr_506", "action": "suspend", "for": "30m"}],
            }
        },
    }
    config.update(extra)
    return config


BULK = "List-Id: <news.example.org>\r\n"


def test_bulk_suspended_at_a_provider_leaves_transactional_flowing(
    relay_factory, dns_server, mx_farm, password_hash
):
    route(dns_server, "orange.test", "127.0.0.60")
    mx = mx_farm.server("127.0.0.60")
    mx.refuse_peer["127.0.0.3"] = p.ORANGE_OFR_506  # Orange has had enough of the lists IP
    relay = relay_factory(**_config(password_hash))
    relay.send("app@example.org", ["reader@orange.test"], make_message("news", headers=BULK))
    relay.wait_log("provider=orange queue=orange@lists suspended for 1800s")
    submit_many(relay, lambda i: [f"u{i}@orange.test"], 30)
    received = mx.wait_messages(30)
    assert {m.peer for m in received} == {"127.0.0.2"}
    assert {m.helo for m in received} == {"mail.example.org"}
    assert max(mx.max_open_by_peer.get("127.0.0.2", 0), 0) <= 2  # orange's limit, per source
    assert mx.max_open_by_peer.get("127.0.0.3", 0) <= 2
    first = received[0].data.decode()
    assert first.startswith("Received: from relay.test by mail.example.org (relay egress main")
    assert "[127.0.0.2])" in first.split("\r\n", 1)[0]
    delivered = (
        ("class", "transactional"),
        ("egress", "main"),
        ("outcome", "delivered"),
        ("provider", "orange"),
    )
    # The MX has the 30th message a moment before the relay hears its 250.
    assert wait_until(lambda: scrape(relay)["relay_deliveries_total"].get(delivered) == 30)
    suspended = scrape(relay)["relay_provider_suspended"]
    assert suspended[(("egress", "lists"), ("provider", "orange"))] == 1
    assert suspended[(("egress", "main"), ("provider", "orange"))] == 0
    log = relay.log()
    assert "to=<u0@orange.test> provider=orange relay=mx.orange.test[127.0.0.60]" in log
    assert "egress=main" in log and "egress=lists" in log


def test_an_account_pinned_to_a_source_overrides_its_class(
    relay_factory, dns_server, mx_farm, password_hash
):
    route(dns_server, "orange.test", "127.0.0.61")
    mx = mx_farm.server("127.0.0.61")
    relay = relay_factory(**_config(password_hash))
    relay.send("app@example.org", ["a@orange.test"], make_message("list", headers=BULK))
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as smtp:
        smtp.starttls()
        smtp.login("pinned", PASSWORD)
        smtp.sendmail("app@example.org", ["b@orange.test"], make_message("pinned bulk"))
    received = {m.rcpt_tos[0]: m for m in mx.wait_messages(2)}
    assert received["a@orange.test"].peer == "127.0.0.3"  # bulk → lists
    assert received["a@orange.test"].helo == "lists.example.org"
    assert received["b@orange.test"].peer == "127.0.0.2"  # the account's main, over bulk


def _check_config(tmp_path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_source_address_not_on_this_machine_or_an_unknown_name_is_refused(
    relay_factory, tmp_path, password_hash
):
    relay = relay_factory(start=False, **_config(password_hash))
    config = dict(relay.config)
    config["egress"] = {**SOURCES, "lists": {"source_address": "192.0.2.20", "ehlo": "l.test"}}
    done = _check_config(tmp_path, config)
    assert done.returncode == 1
    assert "egress.lists.source_address: 192.0.2.20 is not an address of this machine" in (
        done.stderr
    )
    relay.config_path.write_text(yaml.safe_dump(config))
    serve = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 1
    assert "192.0.2.20 is not an address of this machine" in serve.stderr
    config["egress"] = SOURCES
    config["classes"] = {"bulk": {"egress": "nosuch"}}
    done = _check_config(tmp_path, config)
    assert done.returncode == 1
    assert "classes.bulk.egress: unknown egress source 'nosuch'; sources are lists, main" in (
        done.stderr
    )


def test_check_config_shows_the_source_of_each_queue(relay_factory, tmp_path, password_hash):
    relay = relay_factory(start=False, **_config(password_hash))
    done = _check_config(tmp_path, relay.config)
    assert done.returncode == 0, done.stderr
    assert "(transactional, orange) → main [127.0.0.2] ehlo=mail.example.org" in done.stdout
    assert "(bulk, orange) → lists [127.0.0.3] ehlo=lists.example.org" in done.stdout
    assert "account pinned → main (over its class)" in done.stdout


def test_without_sources_nothing_changes(relay_factory, dns_server, mx_farm):
    route(dns_server, "example.test", "127.0.0.62")
    mx = mx_farm.server("127.0.0.62")
    relay = relay_factory()
    relay.send("app@example.org", ["bob@example.test"], make_message("plain"))
    [received] = mx.wait_messages(1)
    assert not received.data.startswith(b"Received: from relay.test by")  # no egress trace
    log = relay.wait_log("status=delivered")
    assert "egress=" not in log


def test_shared_limits_count_every_source_together(
    relay_factory, dns_server, mx_farm, password_hash
):
    route(dns_server, "orange.test", "127.0.0.63")
    mx = mx_farm.server("127.0.0.63")
    config = _config(password_hash)
    config["providers"]["orange"].update(
        {"shared_limits": True, "max_connections": 1, "max_messages_per_connection": 1}
    )
    relay = relay_factory(**config)
    submit_many(relay, lambda i: [f"t{i}@orange.test"], 6)
    for i in range(6):
        relay.send("app@example.org", [f"b{i}@orange.test"], make_message("n", headers=BULK))
    received = mx.wait_messages(12)
    assert {m.peer for m in received} == {"127.0.0.2", "127.0.0.3"}  # each from its source
    assert mx.max_open == 1  # one connection at a time for the provider, all sources together
