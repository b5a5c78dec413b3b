"""Admission control as the listener process asks for it (SPEC §12).

The backlog is counted in the main process (relay.queue.admission); an RCPT of a class
with `max_queued` waits here for its answer, over the socketpair:

    → ("admit", request, ticket, class, domain)   ← ("admitted", request, Refused | None)
    → ("admit_release", ticket, request | None)    the transaction, or one RCPT, is over
    → ("admit_queued", ticket, message ID)         sent just before its "accepted"
    → ("admit_refused", provider, class)           a client was told 452

A ticket names one transaction (MAIL to its end); only tickets that asked are ever
released, so uncapped mail sends nothing and waits for nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Hashable
from typing import Protocol

from relay.listener import ipc
from relay.queue.admission import Refused

log = logging.getLogger("relay.listener")

# A stuck main process must not hold a client for ever: past this the RCPT gets 451.
# Well past a DNS lookup or two (an MX-routed domain is resolved for its answer), well
# short of a client's RCPT timeout (5 min, RFC 5321 §4.5.3.2.3).
ADMIT_TIMEOUT = 30.0
TIMED_OUT = "451 4.3.0 Could not check the destination's backlog, try again later"


class AdmissionControl(Protocol):
    """The main process's side, as the listener supervisor hands it the requests."""

    async def admit(
        self, request: Hashable, ticket: Hashable, class_name: str, domain: str
    ) -> Refused | None: ...

    def release(self, ticket: Hashable, request: Hashable | None = None) -> None: ...

    def queued(self, ticket: Hashable, message_id: str) -> None: ...

    def accepted(self, message_id: str) -> None: ...

    def refused(self, provider: str, class_name: str) -> None: ...

    def reset(self) -> None: ...


class AdmissionClient:
    """The listener process's end: one per process, shared by every session."""

    def __init__(self, writer: asyncio.StreamWriter, timeout: float = ADMIT_TIMEOUT) -> None:
        self._writer = writer
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Refused | None]] = {}
        self._asked: set[int] = set()  # tickets with reservations to release

    def ticket(self) -> int:
        """A new transaction's ticket (nothing is sent until it asks)."""
        return next(self._ids)

    async def admit(self, ticket: int, class_name: str, domain: str) -> str | None:
        """None: the RCPT may be accepted; else the reply refusing it."""
        request = next(self._ids)
        answer: asyncio.Future[Refused | None] = asyncio.get_running_loop().create_future()
        self._waiting[request] = answer
        self._asked.add(ticket)
        self._writer.write(ipc.frame("admit", request, ticket, class_name, domain))
        try:
            refused = await asyncio.wait_for(answer, self._timeout)
        except TimeoutError:
            log.error(
                "admission: no answer from the main process within %.0fs; RCPT to %s answered 451",
                self._timeout,
                domain,
            )
            self._writer.write(ipc.frame("admit_release", ticket, request))
            return TIMED_OUT
        except asyncio.CancelledError:  # the session went away: its slot is not taken
            self._writer.write(ipc.frame("admit_release", ticket, request))
            raise
        finally:
            self._waiting.pop(request, None)
        if refused is None:
            return None
        self._writer.write(ipc.frame("admit_refused", refused.provider, class_name))
        return refused.reply

    def answered(self, request: int, refused: Refused | None) -> None:
        answer = self._waiting.get(request)
        if answer is not None and not answer.done():
            answer.set_result(refused)

    def release(self, ticket: int) -> None:
        """The transaction is over without a message: its slots are free."""
        if ticket in self._asked:
            self._asked.discard(ticket)
            self._writer.write(ipc.frame("admit_release", ticket, None))

    def queued(self, ticket: int, message_id: str) -> None:
        """The transaction's message is durable; its "accepted" report comes next."""
        if ticket in self._asked:
            self._asked.discard(ticket)
            self._writer.write(ipc.frame("admit_queued", ticket, message_id))
