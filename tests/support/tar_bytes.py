"""Tar bytes built by hand for the hostile-input tests and the fuzzer: ustar headers with any size field
(also invalid ones), members, and PAX records."""

from __future__ import annotations

BLOCK = 512


def header(name: bytes, size: int | bytes, typeflag: bytes = b"0") -> bytes:
    """A ustar header with a valid checksum; ``size`` as bytes is written verbatim into the size field."""
    h = bytearray(BLOCK)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = b"0000644\x00"
    h[108:124] = b"0000000\x000000000\x00"
    h[124:136] = size.ljust(12, b"\x00")[:12] if isinstance(size, bytes) else b"%011o\x00" % min(size, 8 ** 11 - 1)
    h[136:148] = b"%011o\x00" % 1_700_000_000
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def member(name: bytes, data: bytes, typeflag: bytes = b"0", size: int | bytes | None = None) -> bytes:
    """Header (declaring ``size``, default the data's length) + data padded to the block."""
    return header(name, len(data) if size is None else size, typeflag) + data + bytes((-len(data)) % BLOCK)


def end() -> bytes:
    return bytes(2 * BLOCK)


def pax(records: list[tuple[bytes, bytes]]) -> bytes:
    """PAX records ``"<len> <key>=<value>\\n"``, where <len> counts its own digits."""
    out = b""
    for k, v in records:
        body = b" " + k + b"=" + v + b"\n"
        length = len(body) + 1
        while len(body) + len(str(length)) != length:
            length = len(body) + len(str(length))
        out += str(length).encode() + body
    return out
