"""What the next hop gets and what admins can race, through `relay serve`: SMTPUTF8 mail
is never downgraded, and two admin bounces of one message bounce it once."""

from __future__ import annotations

import email
import email.policy
import threading

from tests.relayproc import make_message
from tests.support import route, wait_until


def _dsn_status(data: bytes) -> list[str]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    status = next(
        p for p in message.iter_parts() if p.get_content_type() == "message/delivery-status"
    )
    return [dict(block.items())["Status"] for block in status.get_payload()[1:]]


def test_smtputf8_mail_bounces_5_6_7_at_a_hop_without_smtputf8(
    relay_factory, dns_server, mx_farm, example_org
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.smtputf8 = False
    relay = relay_factory()
    utf8 = make_message("Caf\u00e9 \u2615").decode().encode("utf-8")
    with relay.client() as smtp:
        refused = smtp.sendmail(
            "app@example.org", ["bob@example.test"], utf8, mail_options=["SMTPUTF8"]
        )
        assert refused == {}
        # Submitted with SMTPUTF8 but all ASCII: nothing needs the extension, it goes.
        smtp.sendmail(
            "app@example.org",
            ["ann@example.test"],
            make_message("plain"),
            mail_options=["SMTPUTF8"],
        )
    [dsn] = example_org.wait_messages(1, timeout=30)
    assert _dsn_status(dsn.data) == ["5.6.7"]
    assert "SMTPUTF8 is required" in dsn.data.decode("utf-8", "replace")
    [plain] = mx.wait_messages(1)
    assert plain.rcpt_tos == ["ann@example.test"]
    relay.wait_log("dsn=5.6.7 status=bounced")
    assert [m.rcpt_tos for m in mx.messages] == [["ann@example.test"]]  # never downgraded


def test_two_admin_bounces_of_one_message_bounce_it_once(
    relay_factory, dns_server, mx_farm, example_org
):
    # Two destinations: each admin bounce once settled them one group at a time, and a
    # second bounce could take the group the first had not reached yet.
    for domain, address in (("example.test", "127.0.0.2"), ("other.test", "127.0.0.3")):
        route(dns_server, domain, address)
        mx_farm.server(address).rcpt_hook = lambda rcpt: "451 4.3.0 try again later"
    relay = relay_factory(retry={"initial": "1h", "max": "1h"})
    recipients = ["u0@example.test", "u1@other.test", "u2@example.test"]
    queue_id = relay.send("app@example.org", recipients, make_message("twice"))
    assert wait_until(lambda: relay.log().count(f"id={queue_id} to=") >= 3)
    answers: list[tuple[int, object]] = []

    def bounce() -> None:
        answers.append(relay.api("POST", f"/api/queue/{queue_id}/bounce", {}))

    threads = [threading.Thread(target=bounce) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(status for status, _ in answers) in ([200, 200], [200, 404])
    bounced = sum(body["bounced"] for status, body in answers if status == 200)  # type: ignore[index]
    assert bounced == 3
    [dsn] = example_org.wait_messages(1, timeout=30)
    assert _dsn_status(dsn.data) == ["5.0.0"] * 3
    assert wait_until(lambda: relay.spool_files() == [])  # the DSN delivered, nothing left
    assert len(example_org.messages) == 1
