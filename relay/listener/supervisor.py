"""The listener process as the main process sees it: start, reload, drain, restart.

SMTP sessions and spool writes run in a process of their own (relay.listener.worker),
so that taking mail in and delivering it use both cores of a small machine instead of
sharing one event loop. This process keeps the listening sockets (bound here, so a
busy port fails the start with a clear message, and kept open across a restart of the
listener process: clients wait in the backlog) and receives each accepted message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from relay import logs
from relay.config.model import Config
from relay.errors import RelayError
from relay.listener import ipc
from relay.listener.admission import AdmissionControl
from relay.listener.handler import ListenerEvents
from relay.listener.server import bind_sockets
from relay.tasks import spawn

log = logging.getLogger("relay.listener")

RESTART_DELAY = 1.0
START_TIMEOUT = 60.0


class ListenerProcess:
    def __init__(
        self,
        config: Config,
        events: ListenerEvents,
        on_lost: Callable[[float], None],
        admission: AdmissionControl,
    ) -> None:
        """`on_lost(when)`: the process died; messages it stored may not have been reported."""
        self.config = config
        self._events = events
        self._on_lost = on_lost
        self._admission = admission
        self._asking: set[asyncio.Task[Any]] = set()  # admission requests being decided
        self._sockets = bind_sockets(config)
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refused: frozenset[str] = frozenset()  # the account guard's; sent at each start
        self._live_nodes = 1  # a cluster's, last seen; sent at each start
        self.draining = False

    @property
    def serving(self) -> bool:
        return self._ready.is_set() and not self.draining

    async def start(self) -> None:
        """Until the first listener process serves; RelayError if it cannot."""
        self._task = asyncio.create_task(self._supervise(), name="listener-process")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait(
            [ready, self._task], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        if not self._ready.is_set():
            if self._task.done():
                self._task.result()  # raises its error
            raise RelayError(f"the listener process did not start within {START_TIMEOUT:.0f}s")

    def reconfigure(self, config: Config) -> None:
        self.config = config
        if self._writer is not None:
            self._writer.write(ipc.frame("config", config))

    def refuse(self, accounts: frozenset[str]) -> None:
        """Accounts whose MAIL gets 450 4.7.1 (relay/guard), now and in later processes."""
        if accounts == self._refused:
            return
        self._refused = accounts
        if self._writer is not None:
            self._writer.write(ipc.frame("guard", accounts))

    def live_nodes(self, count: int) -> None:
        """The cluster's live nodes last seen: while Redis is down, the listener process
        keeps the account rates at their share (relay/cluster/accountrates.py)."""
        if count == self._live_nodes:
            return
        self._live_nodes = count
        if self._writer is not None:
            self._writer.write(ipc.frame("nodes", count))

    def drain(self, grace: float) -> None:
        """421 to new sessions; the process exits once the open ones end, or at `grace`."""
        self.draining = True
        if self._writer is not None:
            self._writer.write(ipc.frame("drain", grace))

    async def wait_idle(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        self.draining = True
        for task in list(self._asking):
            task.cancel()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()

    async def _supervise(self) -> None:
        first = True
        while True:
            process, reader = await self._spawn()
            while (message := await ipc.receive(reader)) is not None:
                try:
                    self._dispatch(message)
                except Exception:
                    # A bug in one handler must not stop the reports that follow: a lost
                    # "accepted" would leave durable mail unqueued until the next start.
                    log.exception("listener report %r could not be handled", message[:1])
            served = self._ready.is_set()
            self._ready.clear()
            self._writer = None
            self._admission.reset()  # its open transactions are gone with it
            await process.wait()
            if self.draining:
                return
            if first and not served:
                raise RelayError(
                    f"the listener process exited at start (status "
                    f"{process.returncode}); see the log above"
                )
            first = False
            log.error(
                "the listener process exited (status %s); starting another", process.returncode
            )
            self._on_lost(time.time())
            await asyncio.sleep(RESTART_DELAY)
            if self.draining:  # told to stop while waiting: no new process
                return

    def _dispatch(self, message: tuple[object, ...]) -> None:
        kind = message[0]
        if kind == "accepted":
            try:
                self._events.accepted(message[1], message[2], message[3])  # type: ignore[arg-type]
            finally:  # counted in the queue now (or lost to a bug): its slots go either way
                self._admission.accepted(message[1].id)  # type: ignore[attr-defined]
        elif isinstance(kind, str) and kind.startswith("admit"):
            self._admission_frame(message)
        elif kind == "rejected":
            self._events.rejected(message[1])  # type: ignore[arg-type]
        elif kind == "auth_failed":
            self._events.auth_failed()
        elif kind == "dkim_signed":
            self._events.dkim_signed(message[1], message[2])  # type: ignore[arg-type]
        elif kind == "ready":
            self._ready.set()

    def _admission_frame(self, message: tuple[Any, ...]) -> None:
        """The frames of relay.listener.admission."""
        kind, *args = message
        if kind == "admit":
            spawn(self._admit(*args), self._asking, "admission")
        elif kind == "admit_release":
            self._admission.release(*args)
        elif kind == "admit_queued":
            self._admission.queued(*args)
        elif kind == "admit_refused":
            self._admission.refused(*args)

    async def _admit(self, request: Any, ticket: Any, class_name: str, domain: str) -> None:
        """Answer one admission request, to the process that asked (a new one after a
        restart reuses request numbers: it must not get the old one's answer)."""
        writer = self._writer
        try:
            answer = await self._admission.admit(request, ticket, class_name, domain)
        except Exception:
            # Admission protects the queue, it must not turn mail away on a bug: admit.
            log.exception("admission check for %s failed; RCPT admitted", domain)
            answer = None
        if writer is not None and writer is self._writer and not writer.is_closing():
            writer.write(ipc.frame("admitted", request, answer))

    async def _spawn(self) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
        ours, theirs = socket.socketpair()
        fds = {name: [s.fileno() for s in sockets] for name, sockets in self._sockets.items()}
        fmt, level = logs.current()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relay.listener.worker",
                str(theirs.fileno()),
                str(os.getpid()),
                fmt,
                level,
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), *(fd for group in fds.values() for fd in group)],
            )
        finally:
            theirs.close()
        self._process = process
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        writer.write(ipc.frame("start", self.config, fds, self._refused, self._live_nodes))
        self._writer = writer
        return process, reader
