"""Submission load for durability tests: client threads sending messages with unique
Message-IDs, recording which got a 250; and which of them a destination received."""

from __future__ import annotations

import re
import smtplib
import threading
from collections import Counter
from collections.abc import Callable

from tests.mxserver import MxServer
from tests.relayproc import RelayProcess, make_message

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


class Load:
    """`clients` threads, each its own session, until `per_client` messages or stop()."""

    def __init__(
        self,
        relay: RelayProcess,
        tag: str,
        clients: int = 4,
        per_client: int = 10_000,
        recipients: Callable[[int, int], list[str]] = lambda n, i: [f"user{n}@sink.test"],
    ) -> None:
        self.relay = relay
        self.tag = tag
        self.per_client = per_client
        self.recipients = recipients
        self.acked: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def _client(self, n: int) -> None:
        try:
            with self.relay.client() as smtp:
                for i in range(self.per_client):
                    if self._stop.is_set():
                        return
                    message_id = f"{self.tag}-c{n}-m{i}@load.test"
                    smtp.sendmail(
                        "app@example.org",
                        self.recipients(n, i),
                        make_message(
                            f"load {message_id}",
                            body=f"payload\r\nEND {message_id}\r\n",
                            headers=f"Message-ID: <{message_id}>\r\n",
                        ),
                    )
                    with self._lock:
                        self.acked.append(message_id)
                        self._progress.notify_all()
        except (smtplib.SMTPException, OSError):
            return  # the relay went away: what was not acked is the client's to resend

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait_acked(self, count: int, timeout: float = 60) -> bool:
        with self._lock:
            return self._progress.wait_for(lambda: len(self.acked) >= count, timeout)

    def stop(self) -> set[str]:
        """Stop the clients; the set of Message-IDs that got a 250."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        with self._lock:
            return set(self.acked)


def received_ids(server: MxServer) -> Counter[str]:
    """How many times each Message-ID reached the destination."""
    return Counter(
        m.group(1).decode() for r in list(server.messages) if (m := MESSAGE_ID.search(r.data))
    )
