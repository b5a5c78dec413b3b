"""End-to-end throughput: SMTP in → durable spool → delivered to a local sink.

    python bench/throughput.py [--clients 20] [--size 5120] [--seconds 15]

Starts a sink (own process) and `relay serve` (own process, fsync on), drives both
with the same asyncio SMTP client: once straight to the sink (the physical limit of
this machine for this client), once through the relay. Prints one line per path and
the ratio. Only loopback addresses are used; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sink
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(size: int, n: int) -> bytes:
    head = (
        f"From: <bench@[127.0.0.1]>\r\nTo: <sink@sink.test>\r\nSubject: bench {n}\r\n"
        f"Message-ID: <{n}.{time.time_ns()}@bench>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + body.rstrip(b"\r\n") + b"\r\n"


async def _client(port: int, payloads: list[bytes], deadline: float, sent: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.client\r\n")
    await reply()
    for payload in payloads:
        if time.monotonic() > deadline:
            break
        writer.write(b"MAIL FROM:<bench@[127.0.0.1]>\r\n")
        assert (await reply()).startswith(b"250")
        writer.write(b"RCPT TO:<sink@sink.test>\r\n")
        assert (await reply()).startswith(b"250")
        writer.write(b"DATA\r\n")
        assert (await reply()).startswith(b"354")
        writer.write(payload + b".\r\n")
        answer = await reply()
        assert answer.startswith(b"250"), answer
        sent[0] += 1
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()


async def drive(port: int, clients: int, size: int, seconds: float) -> int:
    """Submit from `clients` connections for `seconds`; return how many got a 250."""
    deadline = time.monotonic() + seconds
    payloads = [message(size, n) for n in range(200)]
    sent = [0]
    per_client = [payloads * 1000 for _ in range(clients)]
    await asyncio.gather(*(_client(port, p, deadline, sent) for p in per_client))
    return sent[0]


def wait_count(counter, target: int, timeout: float) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while counter.value < target and time.monotonic() < deadline:
        time.sleep(0.01)
    return time.monotonic()


def run(args: argparse.Namespace) -> None:
    counter = multiprocessing.Value("q", 0)
    ready = multiprocessing.Event()
    sink_port = free_port()
    sink_proc = multiprocessing.Process(
        target=sink.serve, args=("127.0.0.1", sink_port, counter, ready), daemon=True
    )
    sink_proc.start()
    ready.wait(10)
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    relay_port = free_port()
    config = {
        "hostname": "relay.bench",
        "listeners": [
            {
                "name": "bench",
                "address": "127.0.0.1",
                "port": relay_port,
                "tls": "none",
                "auth": "none",
                "trusted_networks": ["127.0.0.1/32"],
            }
        ],
        "spool": {"path": str(workdir / "spool")},
        "defaults": {
            "route": f"127.0.0.1:{sink_port}",
            "max_connections": args.clients,
            "max_messages_per_connection": 1000,
        },
        "delivery": {"idle_connection_timeout": "5s"},
    }
    (workdir / "relay.yaml").write_text(yaml.safe_dump(config))
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "-c",
            str(workdir / "relay.yaml"),
            "--log-level",
            "WARNING",
        ],
        stderr=open(workdir / "relay.log", "wb"),
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", relay_port), 0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        results = {}
        for label, port in (
            ("physical limit (client → sink)", sink_port),
            ("relay (client → relay → sink)", relay_port),
        ):
            start_count = counter.value
            start = time.monotonic()
            sent = asyncio.run(drive(port, args.clients, args.size, args.seconds))
            end = wait_count(counter, start_count + sent, 120)
            delivered = counter.value - start_count
            results[label] = delivered / (end - start)
            print(
                f"{label:34s} {results[label]:8.0f} msg/s  "
                f"({delivered} messages of {args.size} B, {args.clients} clients)"
            )
        limit, through = results.values()
        print(f"{'ratio relay / physical limit':34s} {through / limit:8.2f}")
    finally:
        relay.terminate()
        relay.wait(30)
        sink_proc.terminate()
        sink_proc.join(5)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--seconds", type=float, default=15.0)
    run(parser.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
