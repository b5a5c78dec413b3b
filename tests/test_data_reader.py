"""The DATA reader: terminator, transparency, bare LF, size limit, chunk boundaries."""

from __future__ import annotations

import asyncio

import pytest

from relay.listener.data import read_data


def run(wire: bytes, limit: int = 1 << 20, chunk: int | None = None) -> tuple[bytes, bool, bytes]:
    """Feed `wire` (optionally in small pieces); return content, too_large, leftover."""

    async def go() -> tuple[bytes, bool, bytes]:
        reader = asyncio.StreamReader()
        step = chunk or len(wire) or 1
        for start in range(0, len(wire), step):
            reader.feed_data(wire[start : start + step])
        reader.feed_eof()
        result = await read_data(reader, limit, lambda: None)
        return result.content, result.too_large, await reader.read()

    return asyncio.run(go())


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 5, 7])
def test_terminator_and_transparency_across_chunk_boundaries(chunk):
    wire = b"Subject: x\r\n\r\n..dot\r\n.\r\nMAIL FROM:<a@b.c>\r\n"
    content, too_large, rest = run(wire, chunk=chunk)
    assert content == b"Subject: x\r\n\r\n.dot\r\n"
    assert not too_large
    assert rest == b"MAIL FROM:<a@b.c>\r\n"  # pipelined command given back


def test_empty_message():
    assert run(b".\r\nQUIT\r\n")[0::2] == (b"", b"QUIT\r\n")


@pytest.mark.parametrize("smuggle", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"])
def test_only_crlf_dot_crlf_ends_data(smuggle):
    wire = b"Subject: a\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@x.test>\r\n\r\n.\r\n"
    content, _, rest = run(wire)
    assert rest == b""
    assert b"MAIL FROM:<evil@x.test>" in content
    # Nothing stored can act as a terminator at the next hop.
    assert b"\r\n.\r\n" not in content and b"\n.\n" not in content
    assert content.count(b"\n") == content.count(b"\r\n")


def test_bare_lf_is_normalised():
    content = run(b"a\nb\r\nc\n\r\n.\r\n")[0]
    assert content == b"a\r\nb\r\nc\r\n\r\n"


def test_too_large_is_counted_not_buffered():
    body = b"x" * 998 + b"\r\n"
    content, too_large, rest = run(body * 100 + b".\r\nRSET\r\n", limit=10_000, chunk=4096)
    assert too_large and content == b"" and rest == b"RSET\r\n"


def test_eof_mid_data_raises():
    with pytest.raises(ConnectionResetError):
        run(b"Subject: cut\r\n\r\npartial")
