"""Operating the daemon: metrics, admin API, CLI verbs, reload, graceful shutdown."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from tests.load import Load, received_ids
from tests.relayproc import make_message
from tests.support import depth, route, scrape, wait_until

TOKEN = "test-admin-token"


def cli(relay, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    return relay.cli(*args, token=token)


def api(relay, method: str, path: str, token: str | None = TOKEN, body=None):
    return relay.api(method, path, body, token=token)


def test_every_spec_metric_is_exported(relay_factory, dns_server, mx_farm):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "550 5.1.1 no such user" if a.startswith("nobody") else None
    relay = relay_factory(admin={"token": TOKEN})
    relay.send(
        "app@example.org", ["bob@example.test", "nobody@example.test"], make_message("metrics")
    )
    with relay.client() as smtp:
        assert smtp.mail("intruder@elsewhere.test")[0] == 553
    mx.wait_messages(1)
    relay.wait_log("status=bounced")
    m = scrape(relay)
    for name in (
        "relay_queue_depth",
        "relay_queue_oldest_age_seconds",
        "relay_messages_received_total",
        "relay_messages_rejected_total",
        "relay_deliveries_total",
        "relay_smtp_replies_total",
        "relay_delivery_delay_seconds_bucket",
        "relay_connections_open",
        "relay_provider_suspended",
        "relay_spool_messages",
        "relay_spool_bytes",
        "relay_config_reload_success",
        "relay_account_guard_tripped",
    ):
        assert name in m, name
    assert m["relay_messages_received_total"][(("account", "app"), ("class", "transactional"))] == 1
    assert m["relay_messages_rejected_total"][(("reason", "sender"),)] == 1
    deliveries = m["relay_deliveries_total"]
    assert (
        deliveries[
            (
                ("class", "transactional"),
                ("egress", "default"),
                ("outcome", "delivered"),
                ("provider", "default"),
            )
        ]
        == 1
    )
    assert (
        deliveries[
            (
                ("class", "transactional"),
                ("egress", "default"),
                ("outcome", "bounced"),
                ("provider", "default"),
            )
        ]
        >= 1
    )
    assert (
        m["relay_smtp_replies_total"][
            (("code", "250"), ("egress", "default"), ("provider", "default"))
        ]
        >= 1
    )
    assert (
        m["relay_smtp_replies_total"][
            (("code", "550"), ("egress", "default"), ("provider", "default"))
        ]
        == 1
    )
    assert m["relay_config_reload_success"][()] == 1
    assert m["relay_provider_suspended"] == {(("egress", "default"), ("provider", "default")): 0}
    # /metrics needs no token; the API does
    assert api(relay, "GET", "/api/queue", token=None)[0] == 401
    assert api(relay, "GET", "/healthz", token=None)[0] == 200
    assert api(relay, "GET", "/readyz", token=None) == (200, {"status": "ready"})


def test_queue_depth_per_state_matches_the_workload(relay_factory, dns_server, mx_farm):
    route(dns_server, "slow.test", "127.0.0.33")  # one message a minute: the rest ready
    route(dns_server, "stuck.test", "127.0.0.34")  # suspended: its mail is deferred
    slow, _ = mx_farm.server("127.0.0.33"), mx_farm.server("127.0.0.34")
    relay = relay_factory(
        admin={"token": TOKEN},
        providers={
            "slow": {"domains": ["slow.test"], "rate": "1/min"},
            "stuck": {"domains": ["stuck.test"]},
        },
    )
    assert api(relay, "POST", "/api/providers/stuck/suspend", body={"for": "1h"})[0] == 200
    for i in range(5):
        relay.send("app@example.org", [f"u{i}@slow.test"], make_message(f"slow {i}"))
    held_id = relay.send(
        "app@example.org", ["h1@stuck.test", "h2@stuck.test"], make_message("to hold")
    )
    for i in range(3):
        relay.send("app@example.org", [f"s{i}@stuck.test"], make_message(f"stuck {i}"))
    slow.wait_messages(1)
    assert api(relay, "POST", f"/api/queue/{held_id}/hold")[0] == 200
    assert wait_until(lambda: depth(relay, "slow", "ready") == 4)
    assert depth(relay, "stuck", "deferred") == 3
    assert depth(relay, "stuck", "held") == 2
    m = scrape(relay)
    assert m["relay_provider_suspended"][(("egress", "default"), ("provider", "stuck"))] == 1
    assert m["relay_provider_suspended"][(("egress", "default"), ("provider", "slow"))] == 0
    # The delivered one leaves the spool only once its outcome is settled: wait for it.
    assert wait_until(lambda: scrape(relay)["relay_spool_messages"][()] == 8)
    assert (
        m["relay_queue_oldest_age_seconds"][(("class", "transactional"), ("provider", "stuck"))] > 0
    )
    # After a restart the figures are the same: held and suspended survive it.
    assert relay.stop() == 0
    relay.start()
    assert wait_until(lambda: depth(relay, "stuck", "held") == 2)
    assert depth(relay, "stuck", "deferred") == 3
    assert wait_until(lambda: depth(relay, "slow", "ready") == 3)  # one more went out
    # release + resume: everything drains, the gauges fall to zero
    assert api(relay, "POST", f"/api/queue/{held_id}/release")[0] == 200
    assert api(relay, "POST", "/api/providers/stuck/resume")[0] == 200
    assert wait_until(
        lambda: (
            depth(relay, "stuck", "deferred") == 0
            and depth(relay, "stuck", "held") == 0
            and depth(relay, "stuck", "ready") == 0
        )
    )


def test_cli_verbs_against_a_running_daemon(relay_factory, dns_server, mx_farm, example_org):
    route(dns_server, "later.test", "127.0.0.35")
    mx = mx_farm.server("127.0.0.35")
    mx.rcpt_hook = lambda a: "451 4.7.1 try again later"
    relay = relay_factory(
        admin={"token": TOKEN},
        retry={"initial": "1h", "max": "2h"},
        providers={"later": {"domains": ["later.test"]}},
    )
    ids = [
        relay.send("app@example.org", [f"u{i}@later.test"], make_message(f"q{i}")) for i in range(4)
    ]
    relay.wait_log(f"id={ids[-1]} to=<u3@later.test>")

    listing = cli(relay, "queue", "list")
    assert listing.returncode == 0, listing.stderr
    assert "-Queue ID-" in listing.stdout and "-- 1 Kbytes in 4 Requests." in listing.stdout
    assert "(451 4.7.1 try again later)" in listing.stdout
    assert "u0@later.test  [later, deferred, attempt 1]" in listing.stdout
    as_json = json.loads(cli(relay, "queue", "list", "--provider", "later", "--json").stdout)
    assert sorted(m["id"] for m in as_json) == sorted(ids)
    assert json.loads(cli(relay, "queue", "list", "--provider", "nope", "--json").stdout) == []

    shown = cli(relay, "queue", "show", ids[0])
    assert shown.returncode == 0 and f"id:       {ids[0]}" in shown.stdout
    assert "Subject: q0" in shown.stdout

    assert cli(relay, "queue", "hold", ids[1]).stdout.strip() == f"{ids[1]}: held"
    assert "!" in next(
        line for line in cli(relay, "queue", "list").stdout.splitlines() if line.startswith(ids[1])
    )
    assert cli(relay, "queue", "release", ids[1]).returncode == 0

    mx.rcpt_hook = lambda a: None
    flushed = cli(relay, "queue", "flush", ids[0])
    assert flushed.returncode == 0 and flushed.stdout.startswith("1 deferred")
    assert mx.wait_messages(1)[0].rcpt_tos == ["u0@later.test"]

    assert cli(relay, "queue", "delete", ids[2]).returncode == 0
    assert cli(relay, "queue", "bounce", ids[3]).returncode == 0
    [dsn] = example_org.wait_messages(1)
    assert b"returned to sender by the administrator" in dsn.data

    assert cli(relay, "provider", "suspend", "later", "--for", "1h").returncode == 0
    assert "suspended (suspended by the administrator)" in cli(relay, "provider", "list").stdout
    assert cli(relay, "provider", "resume", "later").returncode == 0
    flushed = cli(relay, "queue", "flush", "--provider", "later")
    assert flushed.returncode == 0
    assert mx.wait_for(lambda: "u1@later.test" in mx.recipients())
    assert cli(relay, "reload").stdout.strip() == "configuration reloaded"
    assert cli(relay, "queue", "list").stdout.strip() == "Mail queue is empty"

    # errors are one clear line, never a traceback
    unknown = cli(relay, "queue", "show", "NOSUCHID")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "relay: no message with ID NOSUCHID in the queue"
    refused = cli(relay, "queue", "list", token="wrong")
    assert refused.returncode == 1 and "refused the token" in refused.stderr
    assert "Traceback" not in refused.stderr + unknown.stderr
    bad = cli(relay, "provider", "suspend", "nosuch", "--for", "1h")
    assert bad.returncode == 1 and "no provider 'nosuch'" in bad.stderr
    relay.stop()
    down = cli(relay, "queue", "list")
    assert down.returncode == 1
    assert down.stderr.startswith("relay: cannot reach the relay daemon at http://127.0.0.1:")
    assert len(down.stderr.strip().splitlines()) == 1


def test_reload_applies_under_load_and_refuses_a_bad_file(relay_factory, dns_server, mx_farm):
    route(dns_server, "load.test", "127.0.0.36")
    mx = mx_farm.server("127.0.0.36")
    relay = relay_factory(admin={"token": TOKEN})
    stop = threading.Event()
    acked: list[str] = []

    def load() -> None:
        with relay.client() as smtp:
            i = 0
            while not stop.is_set() and i < 2000:
                message_id = f"load-{i}@reload.test"
                smtp.sendmail(
                    "app@example.org",
                    [f"u{i}@load.test"],
                    make_message(f"l{i}", headers=f"Message-ID: <{message_id}>\r\n"),
                )
                acked.append(message_id)
                i += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        mx.wait_messages(20)
        # valid change: a new provider with a connection limit, applied by SIGHUP
        relay.config["providers"] = {"load": {"domains": ["load.test"], "max_connections": 1}}
        relay.config_path.write_text(__import__("yaml").safe_dump(relay.config))
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_log("configuration reloaded")
        delivered_before = len(mx.messages)
        assert mx.wait_for(lambda: len(mx.messages) >= delivered_before + 20), (
            "delivery stopped after the reload"
        )
        # an invalid file is kept out, the relay carries on
        relay.config_path.write_text("providers: {load: {rate: fast}}\n")
        status, answer = api(relay, "POST", "/api/reload")
        assert status == 422 and any("providers.load.rate" in e for e in answer["errors"])
        assert scrape(relay)["relay_config_reload_success"][()] == 0
        assert "reload failed, the running configuration stays" in relay.log()
    finally:
        stop.set()
        worker.join(60)
    messages = mx.wait_messages(len(acked), timeout=60)
    ids = [re.search(rb"Message-ID: <([^>]+)>", m.data).group(1).decode() for m in messages]
    assert sorted(ids) == sorted(acked), "lost or duplicated messages across the reload"
    assert "provider=load" in relay.log()  # the new provider took over routing


def test_removed_account_stops_authenticating(relay_factory):
    relay = relay_factory(admin={"token": TOKEN})
    with relay.client():
        pass
    relay.config["accounts"] = []
    relay.config_path.write_text(__import__("yaml").safe_dump(relay.config))
    assert api(relay, "POST", "/api/reload")[0] == 200
    with pytest.raises(smtplib.SMTPAuthenticationError):
        with relay.client():
            pass


def session_until_closed(port: int, timeout: float = 10) -> bytes:
    """All a new session hears before the relay hangs up. The drain reaches the listener
    process a moment after the signal: a session that slipped in hears 220, then 421."""
    received = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while len(received) < 4096 and time.monotonic() < deadline:
            chunk = sock.recv(200)
            if not chunk:
                break
            received += chunk
    return received


def test_sigterm_drains_then_restart_delivers_everything_acked(relay_factory, dns_server, mx_farm):
    route(dns_server, "sink.test", "127.0.0.37")
    mx = mx_farm.server("127.0.0.37")
    relay = relay_factory(admin={"token": TOKEN}, defaults={"rate": "100/s"})
    load = Load(relay, "drain", clients=5, per_client=100).start()  # 500 messages
    assert load.wait_acked(150)
    held_id = "drain-held@load.test"
    with relay.client() as held:
        # A transaction in progress keeps the listener up through the drain, so a session
        # opened once the drain has begun is sure to reach it, and to be turned away.
        assert held.mail("app@example.org")[0] == 250
        assert held.rcpt("held@sink.test")[0] == 250
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_log("shutting down")
        turned_away = session_until_closed(relay.port)
        assert b"421 4.3.2" in turned_away, turned_away
        code, _ = held.data(
            make_message("held", headers=f"Message-ID: <{held_id}>\r\n", to="held@sink.test")
        )
        assert code == 250
    assert relay.proc.wait(60) == 0
    acked = load.stop() | {held_id}
    assert "stopped;" in relay.log()
    relay.start()
    mx.wait_for(lambda: acked <= set(received_ids(mx)), timeout=60)
    counts = received_ids(mx)
    assert acked <= set(counts), f"{len(acked - set(counts))} acknowledged messages lost"
    assert max(counts.values()) == 1, "a graceful stop must not repeat a delivery"


def test_a_transaction_in_progress_finishes_during_the_drain(relay_factory, dns_server, mx_farm):
    route(dns_server, "drain.test", "127.0.0.37")
    mx = mx_farm.server("127.0.0.37")
    relay = relay_factory()
    with relay.client() as smtp:
        smtp.mail("app@example.org")
        smtp.rcpt("late@drain.test")
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_log("shutting down")
        assert b"421 4.3.2" in session_until_closed(relay.port)
        code, _ = smtp.data(make_message("in flight"))
        assert code == 250
    assert relay.proc.wait(60) == 0
    relay.start()
    assert mx.wait_messages(1)[0].rcpt_tos == ["late@drain.test"]


def test_a_second_signal_stops_at_once_and_loses_nothing(relay_factory, dns_server, mx_farm):
    route(dns_server, "drain.test", "127.0.0.37")
    mx = mx_farm.server("127.0.0.37")
    relay = relay_factory(
        args=("--grace", "120"), providers={"stuck": {"domains": ["drain.test"], "rate": "1/h"}}
    )
    ids = [
        relay.send("app@example.org", [f"u{i}@drain.test"], make_message(f"s{i}")) for i in range(3)
    ]
    mx.wait_messages(1)
    with relay.client() as smtp:  # a session that holds the drain open
        smtp.mail("app@example.org")
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_log("shutting down")
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(30) == 0
        assert time.monotonic() - started < 10  # not the 120 s grace
    assert "second signal: stopping now" in relay.log()
    relay.start()
    mx.wait_messages(2)  # a restarted lane's rate starts afresh: one more goes at once
    queued = {m["id"] for m in json.loads(cli(relay, "queue", "list", "--json", token=None).stdout)}
    delivered = {
        re.search(rb"with ESMTPSA id ([0-9A-Z]+)", m.data).group(1).decode() for m in mx.messages
    }
    assert queued | delivered == set(ids) and not queued & delivered


def test_json_logs(relay_factory, dns_server, mx_farm):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(args=("--log-format", "json"))
    queue_id = relay.send("app@example.org", ["bob@example.test"], make_message("json"))
    mx.wait_messages(1)
    relay.wait_log("status=delivered")
    entries = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["message"].startswith(f"id={queue_id} to=<bob@example.test>") for e in entries)
