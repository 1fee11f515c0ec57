"""Image files for tests that must be cheap to write however many pixels they claim."""

from __future__ import annotations

import struct
import zlib


def blank_png(path, width: int, height: int):
    """A valid 1-bit PNG of ``width x height`` zeros, written in a fraction of a second: 20000 x 20000 is a
    40 kB file that OpenCV would decode to 1.2 GB of RGB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    rows = b"\0" * ((width + 7) // 8 + 1) * 1000  # a filter byte and the packed bits of each row
    idat = b"".join(compressor.compress(rows[: len(rows) // 1000 * min(1000, height - start)])
                    for start in range(0, height, 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
