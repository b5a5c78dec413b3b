"""The fan-out benchmark's sink: accepts everything, keeps nothing, counts what a
destination would see.

Like bench/sink.py, plus the figures a receiving site holds a sender to: recipients
accepted in finished transactions, transactions, connections accepted, connections open
now and the most open at once. A connection counts as open from the accept until the
client's FIN or the close, whichever comes first (as tests/mxserver.py counts it), so a
client that opens the next connection before the previous one's FIN is out is caught.
The figures live in shared memory, read by the parent process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from dataclasses import dataclass
from typing import Any

RECIPIENTS, TRANSACTIONS, CONNECTIONS, OPEN, MAX_OPEN = range(5)
_END = b"\r\n.\r\n"
_EHLO = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"


@dataclass(frozen=True)
class Figures:
    recipients: int
    transactions: int
    connections: int
    open: int
    max_open: int


class Counters:
    """Shared between the sink process (which counts) and the benchmark (which reads)."""

    def __init__(self) -> None:
        self._values: Any = multiprocessing.Array("q", 5)

    def read(self) -> Figures:
        with self._values.get_lock():
            return Figures(*self._values[:])

    def reset_max_open(self) -> None:
        """The most open at once, counted afresh from the connections open now."""
        with self._values.get_lock():
            self._values[MAX_OPEN] = self._values[OPEN]

    def opened(self) -> None:
        with self._values.get_lock():
            self._values[CONNECTIONS] += 1
            self._values[OPEN] += 1
            self._values[MAX_OPEN] = max(self._values[MAX_OPEN], self._values[OPEN])

    def closed(self) -> None:
        with self._values.get_lock():
            self._values[OPEN] -= 1

    def delivered(self, recipients: int) -> None:
        with self._values.get_lock():
            self._values[RECIPIENTS] += recipients
            self._values[TRANSACTIONS] += 1


class _Session(asyncio.Protocol):
    """One SMTP session, pipelining welcome; DATA content is skipped up to <CRLF>.<CRLF>."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._in_data = False
        self._scanned = 0  # content already searched for the terminator
        self._recipients = 0
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._open = True
        self._counters.opened()
        transport.write(b"220 sink ESMTP\r\n")

    def eof_received(self) -> bool:
        self._closed()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def _closed(self) -> None:
        if self._open:
            self._open = False
            self._counters.closed()

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        replies = []
        while self._buffer:
            if self._in_data:
                if self._buffer.startswith(b".\r\n"):  # an empty content
                    end = 3
                else:
                    found = self._buffer.find(_END, self._scanned)
                    if found < 0:
                        self._scanned = max(0, len(self._buffer) - len(_END) + 1)
                        break
                    end = found + len(_END)
                del self._buffer[:end]
                self._in_data, self._scanned = False, 0
                self._counters.delivered(self._recipients)
                self._recipients = 0
                replies.append(b"250 2.0.0 Ok: discarded\r\n")
                continue
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            verb = bytes(self._buffer[:4]).upper()
            del self._buffer[: newline + 1]
            if verb in (b"EHLO", b"HELO"):
                replies.append(
                    b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
                )
            elif verb in (b"MAIL", b"RSET"):
                self._recipients = 0
                replies.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"RCPT":
                self._recipients += 1
                replies.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self._in_data = True
                replies.append(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self._transport.write(b"".join(replies))
                self._transport.close()
                self._closed()  # the session is over for the destination from here
                return
            else:
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies:
            self._transport.write(b"".join(replies))


def serve(hosts: list[str], port: int, counters: Counters, ready: Any) -> None:
    """The sink on `port` of every address in `hosts` (distinct loopback hosts)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(
                lambda: _Session(counters), host, port, reuse_address=True, backlog=1024
            )
            for host in hosts
        ]
        ready.set()
        await asyncio.gather(*(server.serve_forever() for server in servers))

    asyncio.run(main())
