"""The DATA reader: terminator, transparency, bare LF and CR, long lines, size limit,
chunk boundaries."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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


def run_stepwise(pieces: list[bytes], limit: int = 1 << 20) -> tuple[bytes, bool]:
    """Hand the reader one piece per loop step, so each of its reads ends where a piece
    does: every boundary the pieces draw is a chunk boundary inside the reader."""

    async def go() -> tuple[bytes, bool]:
        reader = asyncio.StreamReader()
        task = asyncio.ensure_future(read_data(reader, limit, lambda: None))
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()
        result = await task
        return result.content, result.too_large

    return asyncio.run(go())


def reference(body: bytes) -> bytes:
    """What the stored message must be, computed on the whole body at once."""
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    lines = normalised.split(b"\r\n")[:-1]  # the body ends with the CRLF of its last line
    out = []
    for line in lines:
        line = line[1:] if line.startswith(b".") else line
        folded, rest = [line[:998]], line[998:]
        while rest:  # continuation lines: the SPACE plus 997 octets
            folded.append(b" " + rest[:997])
            rest = rest[997:]
        out.append(b"\r\n".join(folded))
    return b"".join(line + b"\r\n" for line in out)


@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_bare_cr_is_normalised_like_bare_lf(chunk):
    content, _, rest = run(b"Subject: cr\r\n\r\na\rb\r\r\nc\r.\r\nd\r\n.\r\nQUIT\r\n", chunk=chunk)
    # "\r.\r\n" is the smuggling pattern for next hops that end lines on CR: here the
    # dot starts a line, and transparency removes it like any other leading dot.
    assert content == b"Subject: cr\r\n\r\na\r\nb\r\n\r\nc\r\n\r\nd\r\n"
    assert rest == b"QUIT\r\n"


def test_cr_at_a_chunk_end_waits_for_the_next_chunk():
    # Every two-piece split, so some split lands right after each CR inside the reader
    # (which holds back a few bytes of each read for the terminator).
    body = b"one\rtwo\r\r\nthree\r\nfour\r\rfive\r\n"
    expected = b"one\r\ntwo\r\n\r\nthree\r\nfour\r\n\r\nfive\r\n"
    for cut in range(1, len(body)):
        assert run_stepwise([body[:cut], body[cut:] + b".\r\n"])[0] == expected, cut


def test_long_lines_are_broken_as_postfix_does():
    header = b"Subject: " + b"s" * 2500
    exact = b"e" * 998
    over = b"o" * 999
    body = header + b"\r\n\r\n" + exact + b"\r\n" + over + b"\r\n" + b"b" * 3000 + b"\r\n"
    content = run(body + b".\r\n")[0]
    lines = content.split(b"\r\n")
    assert max(map(len, lines)) == 998
    assert lines[0] == header[:998] and lines[1] == b" " + header[998:1995]
    assert lines[2] == b" " + header[1995:]  # the Subject stays one (folded) header
    assert lines[3] == b""  # the header/body separator is untouched
    assert lines[4] == exact  # exactly 998 octets: left alone
    assert lines[5:7] == [b"o" * 998, b" o"]
    assert content.replace(b"\r\n ", b"") == body  # unfolding gives back what was sent


@pytest.mark.parametrize("size", [1, 2, 3, 997, 998, 999, 1000, 4096])
def test_long_line_breaks_do_not_depend_on_chunk_boundaries(size):
    body = b"x" * 5000 + b"\r\n" + b".y" * 1200 + b"\r\n"
    pieces = [body[i : i + size] for i in range(0, len(body), size)] + [b".\r\n"]
    assert run_stepwise(pieces)[0] == reference(body)


def test_limit_counts_the_normalised_message():
    # 40,000 bare LFs are 80,000 octets once stored: past a 64,000 limit, as Postfix counts.
    content, too_large = run_stepwise([b"\n" * 40_000, b"\r\n.\r\n"], limit=64_000)
    assert too_large and content == b""
    content, too_large = run_stepwise([b"\n" * 30_000, b"\r\n.\r\n"], limit=64_000)
    assert not too_large and len(content) == 60_002


_SEGMENTS = st.tuples(
    st.sampled_from([b"x", b".", b"\r", b"\n", b"\r\n", b" ", b"\r\n.", b"\n.\n"]),
    st.integers(min_value=1, max_value=1200),
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    segments=st.lists(_SEGMENTS, max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=8),
)
def test_streaming_equals_the_whole_body_reference(segments, cuts):
    body = b"".join(text * count for text, count in segments) + b"\r\n"
    wire = b"\r\n" + body + b".\r\n"
    assume(wire.find(b"\r\n.\r\n") == len(body))  # the only terminator is the last one
    pieces, start = [], 0
    for cut in sorted(set(cuts)):
        if start < cut < len(body):
            pieces.append(body[start:cut])
            start = cut
    pieces += [body[start:], b".\r\n"]
    assert run_stepwise(pieces)[0] == reference(body)
