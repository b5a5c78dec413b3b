"""What a submission session does with a message: decide, stamp, store, hand over.

The `250` for a message is returned only after the spool reports it durable. The
handler sees the session through narrow values (`Transaction`, and the policy's
`Client`), never the session object, so this module does not depend on session.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from relay.config.model import Account, Config, Listener
from relay.dkim import Signer, SigningError
from relay.errors import SpoolError
from relay.history.events import Arrival
from relay.listener.admission import AdmissionClient
from relay.listener.fastdir import dispatch_names
from relay.listener.headers import detect, field_names, header_block, trace_headers
from relay.listener.policy import Client, ConnectionGate, Policy, Refusal
from relay.spool.records import Envelope, EnvelopeRecipient
from relay.spool.store import Spool

log = logging.getLogger("relay.listener")


class ListenerEvents(Protocol):
    """Where the listener reports: the process that queues mail and keeps the metrics."""

    def accepted(self, envelope: Envelope, body_offset: int, arrival: Arrival) -> None:
        """The message is durable; called before the client hears 250. `arrival`: the
        session's facts for the message's timeline."""

    def rejected(self, reason: str) -> None:
        """One refusal, by relay_messages_rejected_total's reason label."""

    def auth_failed(self) -> None:
        """One AUTH refused (wrong credentials or locked out): relay_auth_failures_total."""

    def dkim_signed(self, domain: str, result: str) -> None:
        """A message for a signing domain signed, or refused because it could not be
        (result "signed" or "failed"): relay_dkim_signatures_total."""


class Session(Protocol):
    """What drain and close need of an open session."""

    def close_for_shutdown(self) -> None: ...

    def hang_up(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Transaction:
    """A finished MAIL/RCPT/DATA exchange, as the handler stores it."""

    client: Client
    helo: str
    esmtp: bool
    sender: str  # normalised
    recipients: tuple[EnvelopeRecipient, ...]  # addresses normalised
    envid: str | None
    ret: str | None
    smtputf8: bool
    ticket: int = 0  # its admission control ticket (relay.listener.admission)


class SubmissionHandler:
    def __init__(
        self,
        config: Config,
        listener: Listener,
        policy: Policy,
        gate: ConnectionGate,
        spool: Spool,
        events: ListenerEvents,
        admission: AdmissionClient,
    ) -> None:
        self.config = config  # these three replaced on reload
        self.listener = listener
        # Keys are read here, at config load, not per message; the listener process
        # hands every handler a new Signer with each reloaded config.
        self.signer = Signer.load(config.dkim)
        self.policy = policy
        self.gate = gate
        self.spool = spool
        self.events = events
        self.admission = admission
        self.sessions: set[Session] = set()

    def __dir__(self) -> list[str]:
        return dispatch_names(type(self))

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """Advertise what we implement; no AUTH where the listener offers none."""
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        if self.listener.auth == "none":
            responses = [line for line in responses if not line.startswith("250-AUTH")]
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        responses.append(last)
        return responses

    def refuse(self, refusal: Refusal) -> str:
        """The reply to send, counted under its reason."""
        if refusal.reason is not None:
            self.note_rejected(refusal.reason)
        return refusal.reply

    def note_auth_failed(self) -> None:
        self.events.auth_failed()

    def note_rejected(self, reason: str) -> None:
        self.events.rejected(reason)

    def _envelope_class(self, account: Account | None) -> str:
        """The class the account or listener gives; headers may change it at DATA."""
        return account.class_name if account and account.class_name else self.listener.class_name

    async def admit(self, client: Client, ticket: int, address: str) -> str | None:
        """None: the recipient may be accepted; else the reply refusing it (SPEC §12).

        Asked only for a class with `max_queued`, so other mail pays nothing. The class
        is the one known at RCPT (account, else listener): headers that put a message in
        another class are read only at DATA, too late to refuse one recipient."""
        class_name = self._envelope_class(client.account)
        traffic = self.config.classes.get(class_name)
        if traffic is None or traffic.max_queued is None:
            return None
        return await self.admission.admit(ticket, class_name, address.rpartition("@")[2])

    def _class_for(self, account: Account | None, headers: bytes, names: set[str]) -> str:
        name = self._envelope_class(account)
        triggered = detect(headers, names)
        if triggered:
            for candidate in sorted(self.config.classes.values(), key=lambda c: c.priority):
                if triggered & set(candidate.detect):
                    return candidate.name
        return name

    async def accept(self, transaction: Transaction, content: bytes) -> str:
        account = transaction.client.account
        message_id = self.spool.new_id()
        headers = header_block(content)
        names = field_names(headers)
        now = time.time()
        stamped = (
            trace_headers(
                message_id=message_id,
                hostname=self.config.hostname,
                helo=transaction.helo or "unknown",
                peer_ip=transaction.client.peer_ip,
                tls=transaction.client.tls,
                authenticated=account is not None,
                esmtp=transaction.esmtp,
                recipients=[r.address for r in transaction.recipients],
                names=names,
                now=now,
            )
            + content
        )
        signed = await self._sign(account, message_id, stamped)
        if signed is None:
            return "451 4.3.0 Message could not be signed, try again later"
        stamped, dkim = signed
        envelope = Envelope(
            id=message_id,
            sender=transaction.sender,
            recipients=transaction.recipients,
            received_at=now,
            size=len(stamped),
            class_name=self._class_for(account, headers, names),
            account=account.name if account else "trusted",
            envid=transaction.envid,
            ret=transaction.ret,
            smtputf8=transaction.smtputf8,
        )
        try:
            offset = await self.spool.store(envelope, stamped)
        except SpoolError as exc:
            self.note_rejected("storage")
            log.error("id=%s not accepted: %s", message_id, exc)
            return "452 4.3.1 Insufficient system storage"
        log.info(
            "id=%s from=<%s> account=%s class=%s size=%d nrcpt=%d client=[%s]",
            message_id,
            envelope.sender,
            envelope.account,
            envelope.class_name,
            envelope.size,
            len(envelope.recipients),
            transaction.client.peer_ip,
        )
        client = transaction.client
        arrival = Arrival(client.peer_ip, transaction.helo, client.tls, self.listener.name, dkim)
        # Just before "accepted": its admission slots are held until it is queued.
        self.admission.queued(transaction.ticket, message_id)
        self.events.accepted(envelope, offset, arrival)
        return f"250 2.0.0 Ok: queued as {message_id}"

    async def _sign(
        self, account: Account | None, message_id: str, message: bytes
    ) -> tuple[bytes, str | None] | None:
        """The message as it will be stored, and the domain it is signed for: signed once
        here, after every header relay adds and every line break, so each recipient and
        retry sends these same bytes. None: it could not be signed and must not be
        accepted (unsigned mail from a domain that publishes DMARC would be junked or
        refused downstream)."""
        if account is not None and not account.dkim:
            return message, None
        try:
            signature = await self.signer.sign(message)
        except SigningError as exc:
            self.events.dkim_signed(exc.domain, "failed")
            self.note_rejected("dkim")
            log.error(
                "id=%s not accepted: DKIM signing for %s failed: %s", message_id, exc.domain, exc
            )
            return None
        if signature is None:
            return message, None
        self.events.dkim_signed(signature.domain, "signed")
        return signature.header + message, signature.domain
