"""A fast SMTP sink for benchmarks: accepts everything, counts messages, keeps nothing.

Reads DATA with readuntil on the terminator, so the sink costs little next to what
it measures.
"""

from __future__ import annotations

import asyncio
from multiprocessing.sharedctypes import Synchronized


async def _session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Synchronized
) -> None:  # type: ignore[type-arg]
    writer.write(b"220 sink ESMTP\r\n")
    try:
        while True:
            line = await reader.readuntil(b"\n")
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(
                    b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
                )
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                with counter.get_lock():
                    counter.value += 1
                writer.write(b"250 2.0.0 Ok: discarded\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


def serve(host: str, port: int, counter: Synchronized, ready) -> None:  # type: ignore[no-untyped-def, type-arg]
    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _session(r, w, counter), host, port, limit=1 << 24
        )
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_many(hosts: list[str], port: int, counter: Synchronized, ready) -> None:  # type: ignore[no-untyped-def, type-arg]
    """The same sink on `port` of every address in `hosts` (distinct loopback hosts)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        servers = [
            await asyncio.start_server(
                lambda r, w: _session(r, w, counter), host, port, limit=1 << 24, reuse_address=True
            )
            for host in hosts
        ]
        ready.set()
        await asyncio.gather(*(server.serve_forever() for server in servers))

    asyncio.run(main())
