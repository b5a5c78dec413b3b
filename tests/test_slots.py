"""A connection's slot is freed only once its socket is gone, even when the receiver stops
reading mid-DATA: a graceful close then never completes, and relay must abort it before
it opens another connection (SPEC §5). Seen from the receiver's side, by TCP state."""

from __future__ import annotations

import socket
import struct
import threading
import time

from tests.relayproc import make_message
from tests.support import route

TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8


class Tarpit:
    """Greets, takes MAIL, RCPT and DATA, then never reads again, as a stuck content
    filter would. A connection counts as open until its TCP state says the client closed
    or reset it."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server((host, port))
        self.lock = threading.Lock()
        self.open = self.max_open = self.accepted = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by close()
            with self.lock:
                self.accepted += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            conn.sendall(b"220 tarpit ESMTP\r\n")
            reader = conn.makefile("rb")
            for line in reader:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250 tarpit\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    break
                elif verb == b"QUIT":
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not self.stop.is_set():
                state = struct.unpack("B", conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))
                if state[0] in (TCP_CLOSE, TCP_CLOSE_WAIT):
                    return
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        time.sleep(0.3)  # the accept loop notices within its 0.2 s timeout
        self.listener.close()


def test_a_receiver_that_stops_reading_never_sees_two_connections(
    relay_factory, dns_server, mx_farm
):
    route(dns_server, "tarpit.test", "127.0.0.70")
    tarpit = Tarpit("127.0.0.70", mx_farm.port)
    try:
        relay = relay_factory(
            providers={"tarpit": {"domains": ["tarpit.test"], "max_connections": 1}},
            delivery={"data_xfer_timeout": "1s", "data_done_timeout": "1s"},
            retry={"initial": "1s", "max": "1s", "lifetime": "1h"},
        )
        # Bigger than the socket buffers on both sides, so the write never drains.
        body = ("x" * 998 + "\r\n") * 16_000
        relay.send("app@example.org", ["a@tarpit.test"], make_message("big", body))
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and tarpit.accepted < 3:
            time.sleep(0.1)
        assert tarpit.accepted >= 3, relay.log()[-3000:]
        assert tarpit.max_open == 1, relay.log()[-5000:]
    finally:
        tarpit.close()
