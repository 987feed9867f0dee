"""Small real files for tests: images made with Pillow, a minimal PDF, broken headers;
and the bytes of a finished download."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from gdl.download import Fetched
from gdl.store import Taken, lease_key


def image_bytes(fmt: str, width: int, height: int) -> bytes:
    """A real ``fmt`` ("PNG", "JPEG", "GIF") image of the given size."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, fmt)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring a size whose pixels would never fit in memory (one empty IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def broken_png() -> bytes:
    """PNG signature and IHDR whose checksum is wrong: libmagic says image/png, Pillow refuses."""
    good = bytearray(image_bytes("PNG", 7, 5))
    good[29:33] = b"\x00\x00\x00\x00"  # the IHDR CRC (8 signature + 8 chunk head + 13 data)
    return bytes(good)


def tiny_pdf() -> bytes:
    """A minimal valid one-page PDF with a correct xref table."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def fetched_body(fetched: Fetched) -> bytes:
    """A download's body, from memory (a body that fitted one chunk) or from its temp file."""
    if fetched.body is not None:
        assert fetched.path == ""
        return fetched.body
    with open(fetched.path, "rb") as f:
        return f.read()


def take_holding_lease(store, aggr_id: str, owner: str, **kwargs) -> Taken:
    """``store.take_downloads`` by ``owner`` as the holder of ``aggr_id``'s lease
    (takes are fenced by the lease: the lease passes to ``owner`` first)."""
    store.redis.set(lease_key(aggr_id), owner, px=60_000)
    return store.take_downloads(aggr_id, owner, lease_ttl_ms=60_000, **kwargs)
