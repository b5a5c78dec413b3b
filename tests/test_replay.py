"""`relay replay`: a log recorded from a real run, judged again under a changed config."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from relay.cli import main
from tests import providers as p
from tests.relayproc import make_message
from tests.support import route, wait_until

LAPOSTE_UNAVAILABLE = "451 4.7.1 Service unavailable - try again later"


def replay(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # An explicit encoding: the table's arrow must not depend on the test machine's locale.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "relay", "replay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def deliveries(log: str) -> list[dict[str, Any]]:
    """The delivery lines of a JSON log, as the daemon wrote them."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "delivery":
                found.append(entry)
    return found


def test_replay_of_a_recorded_run(relay_factory, dns_server, mx_farm, example_org, tmp_path):
    route(dns_server, "laposte.net", "127.0.0.21")
    route(dns_server, "orange.fr", "127.0.0.22")
    route(dns_server, "example.test", "127.0.0.2")
    laposte = mx_farm.server("127.0.0.21")
    orange = mx_farm.server("127.0.0.22")
    elsewhere = mx_farm.server("127.0.0.2")
    unavailable_once = p.Quirk(LAPOSTE_UNAVAILABLE, times=1)

    def laposte_rcpt(address: str) -> str | None:
        if address.startswith("erin@"):
            return p.LAPOSTE_LATER  # no rule for it in the running config: bounced
        if address.startswith("frank@"):
            return unavailable_once()
        return None

    laposte.rcpt_hook = laposte_rcpt
    relay = relay_factory(
        args=("--log-format", "json"),
        providers={"laposte": {"domains": ["laposte.net"]}, "orange": {"domains": ["orange.fr"]}},
    )
    for address in ("erin@laposte.net", "frank@laposte.net", "carol@laposte.net"):
        relay.send("app@example.org", [address], make_message(address))
    relay.send("app@example.org", ["olga@orange.fr"], make_message("orange"))
    relay.send("app@example.org", ["bob@example.test"], make_message("elsewhere"))
    laposte.wait_messages(2)  # frank (after one 451) and carol
    orange.wait_messages(1)
    elsewhere.wait_messages(1)
    example_org.wait_messages(1)  # erin's DSN
    expected = {
        ("erin@laposte.net", "bounced"),
        ("frank@laposte.net", "deferred"),
        ("frank@laposte.net", "delivered"),
        ("carol@laposte.net", "delivered"),
        ("olga@orange.fr", "delivered"),
        ("bob@example.test", "delivered"),
        ("app@example.org", "delivered"),
    }
    assert wait_until(
        lambda: expected <= {(e["to"], e["status"]) for e in deliveries(relay.log())}
    ), relay.log()[-4000:]
    assert relay.stop() == 0
    recorded = {e["to"]: e for e in deliveries(relay.log())}
    assert recorded["erin@laposte.net"]["provider"] == "laposte"
    assert recorded["erin@laposte.net"]["reply"] == p.LAPOSTE_LATER
    assert recorded["erin@laposte.net"]["verdict"] == "bounced"

    # NEW.yaml: LPN007_510 means "later" (retry), "Service unavailable" suspends laposte,
    # orange is no longer named, and a DKIM key file that is not on this machine.
    new = dict(relay.config)
    new["providers"] = {
        "laposte": {
            "domains": ["laposte.net"],
            "rules": [
                {"match": "LPN007_510", "action": "retry"},
                {"match": "Service unavailable", "action": "suspend", "for": "30m"},
            ],
        }
    }
    new["dkim"] = {
        "keys": [{"domain": "example.org", "selector": "s1", "key": str(tmp_path / "absent.pem")}]
    }
    new_path = tmp_path / "new.yaml"
    new_path.write_text(yaml.safe_dump(new))

    shown = replay(tmp_path, "--config", str(new_path), str(relay.log_path))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    lpn = re.escape(p.LAPOSTE_LATER)
    assert re.search(
        rf"^ +1 +bounced +→ +deferred +providers\.laposte\.rules\[0\] retry +{lpn}$", out, re.M
    ), out
    assert re.search(
        r"^ +1 +deferred += +deferred +providers\.laposte\.rules\[1\] suspend +"
        + re.escape(LAPOSTE_UNAVAILABLE),
        out,
        re.M,
    ), out
    assert re.search(r"^ +2 +delivered += +delivered +- +250 ", out, re.M), out  # frank, carol
    assert (
        "laposte: 1 bounced → deferred by providers.laposte.rules[0] (match 'LPN007_510', retry)"
        in out
    )
    assert "suspensions that would start: 1\n    laposte at " in out
    assert (
        "by providers.laposte.rules[1] (match 'Service unavailable', suspend, for 30m)\n"
        f"      on {LAPOSTE_UNAVAILABLE}\n" in out
    )
    assert "orange (not in the config: judged under defaults and global rules)" in out
    assert "verdicts that change: 1\n" in out

    document = json.loads(
        replay(tmp_path, "--json", "-c", str(new_path), str(relay.log_path)).stdout
    )
    assert document["deliveries"] == len(deliveries(relay.log())) >= 7
    assert document["changes"] == [
        {
            "provider": "laposte",
            "then": "bounced",
            "now": "deferred",
            "rule": {
                "key": "providers.laposte.rules[0]",
                "match": "LPN007_510",
                "action": "retry",
                "for": None,
                "rate": None,
                "max_connections": None,
            },
            "count": 1,
        }
    ]
    rows = [(pr["provider"], r) for pr in document["providers"] for r in pr["replies"]]
    unchanged = [r for _, r in rows if r["reply"] != p.LAPOSTE_LATER]
    assert unchanged and all(r["then"] == r["now"] and not r["changed"] for r in unchanged)
    [suspension] = document["suspensions"]
    assert suspension["provider"] == "laposte"
    assert suspension["rule"]["key"] == "providers.laposte.rules[1]"
    assert suspension["rule"]["for"] == 1800
    assert suspension["attempts_inside"] >= 1  # frank's retry, a second later
    assert document["throttles"] == []
    assert document["not_in_config"] == {"orange": 1}
    assert document["skipped"]["other"] > 0  # startup, receipt and DSN lines


def delivery_line(
    provider: str, reply: str, status: str, overrides: dict[str, Any] | None = None
) -> str:
    """A delivery line as queue/outcomes.py writes it, with `overrides` of its keys."""
    entry = {
        "time": "2026-03-02T10:00:00.000Z",
        "level": "info",
        "logger": "relay.delivery",
        "message": f"id=X to=<a@b> provider={provider} relay=none delay=0.1 attempt=1 "
        f"dsn=5.0.0 status={status} ({reply})",
        "event": "delivery",
        "id": "X",
        "to": "a@b",
        "provider": provider,
        "relay": None,
        "attempt": 1,
        "status": status,
        "verdict": status,
        "reply": reply,
        "remote": True,
    }
    return json.dumps({**entry, **(overrides or {})})


def at(clock: str) -> dict[str, str]:
    return {"time": f"2026-03-02T{clock}:00.000Z"}


def write_config(path: Path, **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"hostname": "relay.test", **extra}))
    return path


def test_malformed_and_other_lines_are_skipped_and_counted(tmp_path, capsys):
    text_only = {
        "time": "2026-03-02T10:00:05.000Z",
        "level": "info",
        "logger": "relay.delivery",
        # a log written before the line carried its facts as keys: read from the text
        "message": "id=Y to=<c@laposte.net> provider=laposte relay=none delay=1.0 attempt=3 "
        "dsn=5.4.7 status=expired (550 5.4.7 delivery time expired (last reply: "
        f"{LAPOSTE_UNAVAILABLE}))",
    }
    log = tmp_path / "relay.log"
    with log.open("wb") as handle:
        for line in (
            delivery_line("laposte", p.LAPOSTE_LATER, "bounced"),
            json.dumps(text_only),
            json.dumps({"level": "info", "message": "relay started"}),
            json.dumps(
                {"message": "provider=laposte queue=laposte suspended for 1800s: 451 4.7.1 x"}
            ),
            "",
            '{"time": "2026-03-02T10:00:0',  # cut short by a crash
            "Traceback (most recent call last):",
            "[1, 2]",
            delivery_line("laposte", p.LAPOSTE_LATER, "bounced", {"reply": 550}),
            delivery_line("laposte", "OK", "delivered"),
            "x" * 100_000,
        ):
            handle.write(line.encode() + b"\n")
        handle.write(b'{"message": "\xff\xfe"\n')  # not UTF-8, and not JSON once replaced
    config = write_config(
        tmp_path / "new.yaml",
        providers={
            "laposte": {
                "domains": ["laposte.net"],
                "rules": [{"match": "LPN007", "action": "retry"}],
            }
        },
    )
    assert main(["replay", "--json", "--config", str(config), str(log)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["skipped"] == {"other": 2, "malformed": 7}
    assert document["deliveries"] == 2
    assert document["lines"] == 11
    assert document["suspensions_then"] == {"laposte": 1}
    [laposte] = document["providers"]
    replies = {r["reply"]: r for r in laposte["replies"]}
    assert replies[p.LAPOSTE_LATER]["then"] == "bounced"
    assert replies[p.LAPOSTE_LATER]["now"] == "deferred"
    # the expired recipient: the server's last reply, judged deferred then and now
    assert replies[LAPOSTE_UNAVAILABLE]["then"] == replies[LAPOSTE_UNAVAILABLE]["now"] == "deferred"

    # a rotated, gzipped copy reads the same, one file after the other
    rotated = tmp_path / "relay.log.1.gz"
    rotated.write_bytes(gzip.compress(log.read_bytes()))
    assert main(["replay", "--json", "--config", str(config), str(rotated), str(log)]) == 0
    both = json.loads(capsys.readouterr().out)
    assert (both["deliveries"], both["skipped"]) == (4, {"other": 4, "malformed": 14})


def test_provider_rules_come_before_global_rules(tmp_path, capsys):
    log = tmp_path / "relay.log"
    log.write_text(
        "\n".join(
            [
                delivery_line("laposte", p.LAPOSTE_LATER, "bounced"),
                delivery_line("gone", p.LAPOSTE_LATER, "bounced"),
                delivery_line("default", p.ORANGE_OFR_506, "bounced"),
                # within the 5m suspension the first would start, then after it
                delivery_line("default", p.ORANGE_OFR_506, "bounced", at("10:01")),
                delivery_line("default", p.ORANGE_OFR_506, "bounced", at("10:06")),
            ]
        )
    )
    config = write_config(
        tmp_path / "new.yaml",
        providers={
            "laposte": {
                "domains": ["laposte.net"],
                "rules": [{"match": "lpn007", "action": "retry"}],
            }
        },
        defaults={"rules": [{"match": "ofr_506", "action": "suspend", "for": "5m"}]},
        rules=[
            {"match": "LPN007_510", "action": "bounce"},
            {"match": "ofr_506", "action": "retry"},
        ],
    )
    assert main(["replay", "--json", "-c", str(config), str(log)]) == 0
    document = json.loads(capsys.readouterr().out)
    decided = {
        pr["provider"]: (r["now"], r["rule"]["key"])
        for pr in document["providers"]
        for r in pr["replies"]
    }
    assert decided == {
        "laposte": ("deferred", "providers.laposte.rules[0]"),  # its own rule, case-insensitive
        "gone": ("bounced", "rules[0]"),  # no longer named: defaults' rules, then global
        "default": ("deferred", "defaults.rules[0]"),
    }
    assert document["not_in_config"] == {"gone": 1}
    suspensions = [(s["provider"], s["at"], s["attempts_inside"]) for s in document["suspensions"]]
    assert suspensions == [
        ("default", "2026-03-02T10:00:00Z", 1),
        ("default", "2026-03-02T10:06:00Z", 0),
    ]


def test_an_unreadable_log_or_config_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "new.yaml")
    assert main(["replay", "-c", str(config), str(tmp_path / "absent.log")]) == 1
    assert "cannot read" in capsys.readouterr().err
    bad = write_config(tmp_path / "bad.yaml", rules=[{"match": "(", "action": "retry"}])
    (tmp_path / "empty.log").write_text("")
    assert main(["replay", "-c", str(bad), str(tmp_path / "empty.log")]) == 1
    assert "rules[0].match" in capsys.readouterr().err
