"""What a submission session does with a message: decide, stamp, store, hand over.

The `250` for a message is returned only after the spool reports it durable.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from relay.config.model import Account, Config, Listener
from relay.dns.resolver import Resolver
from relay.errors import DnsTemporaryError, SpoolError
from relay.listener.fastdir import dispatch_names
from relay.listener.headers import detect, field_names, header_block, trace_headers
from relay.listener.policy import ConnectionGate, Policy
from relay.spool.records import Envelope
from relay.spool.store import Spool

if TYPE_CHECKING:
    from relay.listener.session import Submission

log = logging.getLogger("relay.listener")


class ListenerEvents(Protocol):
    """Where the listener reports: the process that queues mail and keeps the metrics."""

    def accepted(self, envelope: Envelope, body_offset: int) -> None:
        """The message is durable; called before the client hears 250."""

    def rejected(self, reason: str) -> None:
        """One refusal, by relay_messages_rejected_total's reason label."""


class SubmissionHandler:
    def __init__(
        self,
        config: Config,
        listener: Listener,
        policy: Policy,
        gate: ConnectionGate,
        spool: Spool,
        events: ListenerEvents,
        resolver: Resolver,
    ) -> None:
        self.config = config  # both replaced on reload
        self.listener = listener
        self.policy = policy
        self.gate = gate
        self.spool = spool
        self.events = events
        self.resolver = resolver  # replaced on reload
        self.sessions: set[Submission] = set()

    def __dir__(self) -> list[str]:
        return dispatch_names(type(self))

    async def handle_EHLO(
        self, server: Submission, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """Advertise what we implement; no AUTH where the listener offers none."""
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        if self.listener.auth == "none":
            responses = [line for line in responses if not line.startswith("250-AUTH")]
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        responses.append(last)
        return responses

    def account_of(self, server: Submission) -> Account | None:
        session = server.session
        if session is None or not session.authenticated:
            return None
        login = getattr(session.auth_data, "login", b"")
        return self.config.account(login.decode("utf-8", "replace"))

    def may_submit(self, server: Submission) -> str | None:
        """Never an open relay: AUTH or a trusted network, else no MAIL."""
        if server.trusted or self.account_of(server) is not None:
            return None
        self.note_rejected("auth")
        if self.listener.auth == "none":
            return "554 5.7.1 Relay access denied: client not in trusted networks"
        return "530 5.7.0 Authentication required"

    async def check_sender(self, server: Submission, sender: str) -> str | None:
        """Null sender, the account's own senders, its rate, a domain bounces can reach."""
        if not sender:
            self.note_rejected("sender")
            return "550 5.7.1 Null sender is not allowed on submission"
        account = self.account_of(server)
        if account is not None and not self.policy.sender_allowed(account, sender):
            self.note_rejected("sender")
            log.warning(
                "sender <%s> refused for account %s from %s", sender, account.name, server.peer_ip
            )
            return f"553 5.7.1 Sender address rejected: <{sender}> not owned by user {account.name}"
        if account is not None and not self.policy.rates.allow(account):
            self.note_rejected("rate")
            log.warning(
                "account %s over its rate %s: MAIL refused from %s",
                account.name,
                account.rate,
                server.peer_ip,
            )
            return (
                f"450 4.7.1 Error: account {account.name} is over its sending rate "
                f"({account.rate}); try again later"
            )
        return await self._sender_domain(sender)

    async def _sender_domain(self, sender: str) -> str | None:
        """A return path must be routable, or bounces have nowhere to go (Postfix's
        reject_unknown_sender_domain)."""
        domain = sender.rpartition("@")[2].lower()
        try:
            routable = await self.resolver.routable(domain)
        except DnsTemporaryError:
            return f"451 4.1.8 <{sender}>: Sender address rejected: cannot look up {domain}"
        if not routable:
            self.note_rejected("sender")
            return f"550 5.1.8 <{sender}>: Sender address rejected: {domain} accepts no mail"
        return None

    def note_rejected(self, reason: str) -> None:
        self.events.rejected(reason)

    def _class_for(self, account: Account | None, headers: bytes, names: set[str]) -> str:
        name = account.class_name if account and account.class_name else self.listener.class_name
        triggered = detect(headers, names)
        if triggered:
            for candidate in sorted(self.config.classes.values(), key=lambda c: c.priority):
                if triggered & set(candidate.detect):
                    return candidate.name
        return name

    async def accept(self, server: Submission, content: bytes) -> str:
        assert server.envelope is not None and server.session is not None
        account = self.account_of(server)
        message_id = self.spool.new_id()
        headers = header_block(content)
        names = field_names(headers)
        now = time.time()
        stamped = (
            trace_headers(
                message_id=message_id,
                hostname=self.config.hostname,
                helo=server.session.host_name or "unknown",
                peer_ip=server.peer_ip,
                tls=server.tls_active,
                authenticated=account is not None,
                esmtp=bool(server.session.extended_smtp),
                recipients=[r.address for r in server.recipients],
                names=names,
                now=now,
            )
            + content
        )
        envelope = Envelope(
            id=message_id,
            sender=server.envelope.mail_from or "",
            recipients=tuple(server.recipients),
            received_at=now,
            size=len(stamped),
            class_name=self._class_for(account, headers, names),
            account=account.name if account else "trusted",
            envid=server.mail_params.get("ENVID"),
            ret=server.mail_params.get("RET"),
            smtputf8=bool(server.envelope.smtp_utf8),
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
            server.peer_ip,
        )
        self.events.accepted(envelope, offset)
        return f"250 2.0.0 Ok: queued as {message_id}"
