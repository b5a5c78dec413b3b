"""Build an RFC 3464 multipart/report DSN, byte for byte.

Written by hand rather than with email.mime: the message/delivery-status part has
its own field syntax (RFC 3464 §2) that the email package does not model, and the
returned original must go out exactly as we received it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC
from email.utils import format_datetime, localtime, make_msgid

from relay.listener.address import PathError, decode_xtext
from relay.reply import Reply
from relay.spool.records import Envelope, EnvelopeRecipient

# RET absent: return the whole message unless it is large (Postfix: bounce_size_limit).
FULL_RETURN_LIMIT = 50 * 1024


@dataclass(frozen=True, slots=True)
class Failure:
    recipient: EnvelopeRecipient
    reply: Reply
    remote_mta: str | None  # host name when the reply came from a remote server
    action: str = "failed"  # failed | delayed | relayed (RFC 3464 §2.3.3)


def _date(timestamp: float) -> str:
    from datetime import datetime

    return format_datetime(localtime(datetime.fromtimestamp(timestamp, UTC)))


def _headers_of(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def _clean(text: str) -> str:
    return " ".join(text.split())


def _original_recipient(orcpt: str) -> str:
    """ORCPT as the report shows it: addr-type ";" the address itself (RFC 3464 §2.3.1).

    The spool keeps ORCPT as the client sent it, xtext-encoded (RFC 3461 §4.2), because
    that is how the next hop gets it; the report decodes it (RFC 3461 §4: "+HH" is octet
    HH). The report part is ASCII (UTF-8 would need RFC 6533's global report), so a value
    that decodes to anything but printable ASCII (control characters included: the
    listener refuses those, a spool may hold older ones) or does not decode is shown as
    sent: xtext is printable ASCII, and cannot add a line to the report.
    """
    kind, _, encoded = orcpt.partition(";")
    try:
        address = decode_xtext(encoded)
    except PathError:
        return orcpt
    if not all(" " <= char <= "~" for char in address):
        return orcpt
    return f"{kind};{address}"


def build_dsn(
    hostname: str, envelope: Envelope, failures: list[Failure], original: bytes, now: float
) -> bytes:
    boundary = f"{envelope.id}.{secrets.token_hex(8)}/{hostname}"
    delayed = all(f.action == "delayed" for f in failures)
    relayed = all(f.action == "relayed" for f in failures)
    subject = (
        "Delayed Mail (still being retried)"
        if delayed
        else "Successful Mail Delivery Report"
        if relayed
        else "Undelivered Mail Returned to Sender"
    )
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        (
            "Your message could not be delivered yet to the recipients below. It is still "
            "queued and will be retried; you need not send it again."
            if delayed
            else "Your message was relayed to the recipients' next mail system below, which "
            "does not report deliveries: you will get no further notice of success from it."
            if relayed
            else "I'm sorry to have to inform you that your message could not be delivered to "
            "one or more recipients. It's attached below."
        ),
        "",
    ]
    for failure in failures:
        where = f" (host {failure.remote_mta} said)" if failure.remote_mta else ""
        human.append(f"<{failure.recipient.address}>{where}: {_clean(str(failure.reply))}")
    per_message = [f"Reporting-MTA: dns; {hostname}"]
    if envelope.envid:
        per_message.append(f"Original-Envelope-Id: {_clean(envelope.envid)}")
    per_message.append(f"Arrival-Date: {_date(envelope.received_at)}")
    blocks = ["\r\n".join(per_message)]
    for failure in failures:
        fields = []
        if failure.recipient.orcpt:
            orcpt = _original_recipient(failure.recipient.orcpt)
            fields.append(f"Original-Recipient: {_clean(orcpt)}")
        fields += [
            f"Final-Recipient: rfc822; {failure.recipient.address}",
            f"Action: {failure.action}",
            f"Status: {failure.reply.status}",
        ]
        if failure.remote_mta:
            fields.append(f"Remote-MTA: dns; {failure.remote_mta}")
            fields.append(f"Diagnostic-Code: smtp; {_clean(str(failure.reply))}")
        else:
            fields.append(f"Diagnostic-Code: X-Relay; {_clean(str(failure.reply))}")
        fields.append(f"Last-Attempt-Date: {_date(now)}")
        blocks.append("\r\n".join(fields))

    # RFC 3461 §4.3: RET is about "failed" DSNs; a success notice carries the headers.
    full = not relayed and (
        envelope.ret == "FULL" or (envelope.ret is None and len(original) <= FULL_RETURN_LIMIT)
    )
    if full:
        returned_type, returned = "message/rfc822", original
    else:
        returned_type, returned = "text/rfc822-headers", _headers_of(original)
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"

    head = "\r\n".join(
        [
            f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
            f"To: <{envelope.sender}>",
            f"Subject: {subject}",
            f"Date: {_date(now)}",
            f"Message-ID: {make_msgid(domain=hostname)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;"
            f'\r\n\tboundary="{boundary}"',
            "Content-Transfer-Encoding: 8bit",
            "",
            "This is a MIME-encapsulated message.",
            "",
            f"--{boundary}",
            "Content-Description: Notification",
            "Content-Type: text/plain; charset=utf-8",
            "",
            "\r\n".join(human),
            "",
            f"--{boundary}",
            "Content-Description: Delivery report",
            "Content-Type: message/delivery-status",
            "",
            "\r\n\r\n".join(blocks),
            "",
            f"--{boundary}",
            "Content-Description: "
            + (
                "Message Headers"
                if relayed
                else "Undelivered Message"
                if full
                else "Undelivered Message Headers"
            ),
            f"Content-Type: {returned_type}",
            "",
            "",
        ]
    )
    return head.encode("utf-8") + returned + f"\r\n--{boundary}--\r\n".encode()
