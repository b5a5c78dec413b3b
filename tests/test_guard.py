"""The account guard end to end (SPEC §12): `relay serve`, real SMTP clients, recording
MX servers and DNS on loopback.

The seed's case: an account that usually sends 50 recipients an hour is taken over and
sends 2,000 messages to random addresses, half of which the MX rejects with 550. The
guard holds it within its first few hundred, while another account's mail flows; `relay
account list` shows why, and `relay account release` lets the held mail go. The
baseline of 50/h is seeded in the guard's state file before the start, as a relay that
has known the account for a week would have saved it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import yaml

from tests.relayproc import RelayProcess, make_message
from tests.support import depth, route, scrape, wait_until

TOKEN = "guard-test-token"
ATTACK = 2000


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return relay.cli(*args, token=TOKEN)


def _accounts(password_hash: str, **guard: object) -> list[dict[str, object]]:
    """`app` (the one taken over) and `shop` (an innocent neighbour on the same host)."""
    app: dict[str, object] = {
        "name": "app",
        "password": password_hash,
        "senders": ["*@example.org"],
    }
    if guard:
        app["guard"] = guard
    shop = {"name": "shop", "password": password_hash, "senders": ["shop@example.org"]}
    return [app, shop]


def _tripped(relay: RelayProcess, account: str) -> float:
    return scrape(relay)["relay_account_guard_tripped"].get((("account", account),), -1.0)


def _line(listing: subprocess.CompletedProcess[str], account: str) -> str:
    """`account`'s line of `relay account list`."""
    return next(line for line in listing.stdout.splitlines() if line.startswith(account + " "))


def _finished(relay: RelayProcess) -> float:
    """Recipients delivered or rejected so far."""
    deliveries = scrape(relay)["relay_deliveries_total"]
    return sum(v for k, v in deliveries.items() if dict(k)["outcome"] in ("delivered", "bounced"))


def _send(relay: RelayProcess, user: str, sender: str, recipients: list[str]) -> None:
    """One session, one message per recipient, no DSN asked (NOTIFY=NEVER): the bounces
    of an attack are not this test's subject."""
    with relay.client(login=user) as smtp:
        for i, rcpt in enumerate(recipients):
            smtp.sendmail(
                sender,
                [rcpt],
                make_message(f"{user} {i}", sender=sender),
                rcpt_options=["NOTIFY=NEVER"],
            )


def test_a_compromised_account_is_held_and_released(
    relay_factory, dns_server, mx_farm, password_hash, tmp_path: Path
):
    route(dns_server, "random.test", "127.0.0.2")
    route(dns_server, "customers.test", "127.0.0.3")
    victims = mx_farm.server("127.0.0.2")
    victims.rcpt_hook = lambda a: "550 5.1.1 no such user" if a.startswith("x") else None
    customers = mx_farm.server("127.0.0.3")
    state = tmp_path / "spool" / "state"
    state.mkdir(parents=True)
    (state / "guard.json").write_text(
        json.dumps({"version": 1, "accounts": {"app": {"baseline": 50, "hours": 168}}})
    )
    relay = relay_factory(admin={"token": TOKEN}, accounts=_accounts(password_hash), guard={})
    started = time.monotonic()

    # 2,000 messages over 4 sessions; half the addresses do not exist. Meanwhile the
    # shop sends its 20 orders as usual.
    recipients = [f"{'x' if i % 2 else 'u'}{i}@random.test" for i in range(ATTACK)]
    threads = [
        threading.Thread(target=_send, args=(relay, "app", "app@example.org", recipients[t::4]))
        for t in range(4)
    ]
    orders = [f"order{i}@customers.test" for i in range(20)]
    threads.append(threading.Thread(target=_send, args=(relay, "shop", "shop@example.org", orders)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    submitted = time.monotonic() - started

    assert wait_until(lambda: _tripped(relay, "app") == 1)
    assert _tripped(relay, "shop") == 0
    customers.wait_messages(20)  # the neighbour's mail flowed, untouched
    assert sorted(customers.recipients()) == sorted(orders)
    # Everything of app's is now delivered, rejected or held: nothing else moves.
    assert wait_until(
        lambda: depth(relay, "default", "held") + _finished(relay) - len(orders) >= ATTACK,
        timeout=30,
    )
    held = depth(relay, "default", "held")
    went_out = _finished(relay) - len(orders)
    assert went_out <= 300, f"{went_out} recipients reached the MX before the guard held the rest"
    accepted_before = len(victims.recipients())
    assert accepted_before <= went_out

    listing = cli(relay, "account", "list")
    assert listing.returncode == 0, listing.stderr
    assert _line(listing, "app").split()[1:3] == ["tripped", "hold"]
    assert " 50 " in _line(listing, "app")  # the seeded baseline
    assert "since " in listing.stdout and "recipients" in listing.stdout  # why
    assert _line(listing, "shop").split()[1] == "ok"
    code, page = relay.api("GET", "/", token=TOKEN)  # the status page reads the same gauge
    assert code == 200 and "<h2>Tripped accounts</h2><ul><li class=bad>app</li></ul>" in page
    rows = {r["account"]: r for r in json.loads(cli(relay, "account", "list", "--json").stdout)}
    assert rows["app"]["state"] == "tripped" and rows["app"]["volume"] == ATTACK
    assert rows["shop"]["state"] == "ok" and rows["shop"]["volume"] == 20

    # A held message says who held it and why, in the queue and in its timeline.
    code, page = relay.api("GET", "/api/queue?state=held&limit=1", token=TOKEN)
    assert code == 200
    [message] = page["messages"]
    assert message["hold_reason"] == "guard" and message["account"] == "app"
    shown = cli(relay, "queue", "show", message["id"])
    assert "(held by the account guard)" in shown.stdout
    assert "account guard" in shown.stdout.split("timeline")[-1]

    released = cli(relay, "account", "release", "app")
    assert released.returncode == 0, released.stderr
    count = int(released.stdout.split("; ")[1].split()[0])
    assert count == held  # one recipient per message
    assert _tripped(relay, "app") == 0
    # The held mail goes out: every address that exists gets its message.
    victims.wait_messages(ATTACK // 2, timeout=60)
    assert sorted(victims.recipients()) == sorted(r for r in recipients if r.startswith("u"))
    assert wait_until(lambda: depth(relay, "default", "held") == 0)
    # Its rejects were judged when it tripped: the released mail does not trip it again.
    assert _tripped(relay, "app") == 0
    assert time.monotonic() - started < 90, (submitted, time.monotonic() - started)


def test_refuse_mode_answers_450_and_a_trip_outlives_a_restart(
    relay_factory, dns_server, mx_farm, password_hash
):
    route(dns_server, "customers.test", "127.0.0.3")
    customers = mx_farm.server("127.0.0.3")
    relay = relay_factory(
        admin={"token": TOKEN},
        accounts=_accounts(password_hash, action="refuse", min_volume=20),
    )
    _send(relay, "app", "app@example.org", [f"c{i}@customers.test" for i in range(21)])
    assert wait_until(lambda: _tripped(relay, "app") == 1)

    def app_mail_code() -> int:
        with relay.client() as smtp:
            code, reply = smtp.mail("app@example.org")
            if code != 250:
                assert reply.decode().startswith(
                    "4.7.1 Error: account app is suspended by the account guard"
                ), reply
            return code

    # The listener process hears of the trip from the main process: soon, not at once.
    assert wait_until(lambda: app_mail_code() == 450, timeout=10)
    with relay.client(login="shop") as smtp:
        assert smtp.mail("shop@example.org")[0] == 250
    assert scrape(relay)["relay_messages_rejected_total"][(("reason", "guard"),)] >= 1

    relay.stop()
    relay.start()
    assert app_mail_code() == 450  # told at the listener's start, before any session
    with relay.client(login="shop") as smtp:
        assert smtp.mail("shop@example.org")[0] == 250
    listing = cli(relay, "account", "list")
    assert _line(listing, "app").split()[1] == "tripped"
    assert "over min_volume 20" in listing.stdout
    assert depth(relay, "default", "held") == 1  # the 21st, accepted before the trip

    # A reload turns the account's action to hold: its MAIL is taken again, and held.
    relay.config["accounts"] = _accounts(password_hash, action="hold", min_volume=20)
    relay.config_path.write_text(yaml.safe_dump(relay.config))
    assert cli(relay, "reload").returncode == 0
    assert wait_until(lambda: app_mail_code() == 250, timeout=10)
    _send(relay, "app", "app@example.org", ["late@customers.test"])
    assert wait_until(lambda: depth(relay, "default", "held") == 2)

    released = cli(relay, "account", "release", "app")
    assert released.stdout.strip() == "app: released; 2 held messages go out"
    customers.wait_messages(22)
    assert "late@customers.test" in customers.recipients()
    unknown = cli(relay, "account", "release", "nobody")
    assert unknown.returncode == 1 and "no account 'nobody'" in unknown.stderr
