"""Digests of a download: the ``sha256`` every callback reports, and the
job's expected ``checksum``.

:func:`parse` reads a job's ``checksum`` field (``"<alg>=<hex>"``) into an
:class:`Expected`; :class:`Digests` is fed each chunk of a body as it
streams (no second read of the file) and, at the end, gives the sha-256 and
checks the expected digest, raising :class:`~gdl.errors.ChecksumMismatch`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from gdl.errors import ChecksumMismatch, ValidationError

# Algorithm names as the checksum field spells them (RFC 9530's registry) -> hashlib's.
ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512", "sha-1": "sha1", "md5": "md5"}
ALIASES = {"sha256": "sha-256"}
_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")


@dataclass(frozen=True)
class Expected:
    """An expected digest: ``algorithm`` as the field names it (``sha-256``), ``hex`` in lower case."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}={self.hex}"


def parse(value: str) -> Expected:
    """``"sha-256=<hex>"`` (or ``sha-512``, ``sha-1``, ``md5``; ``sha256`` for ``sha-256``; hex in
    either case) as an :class:`Expected`; anything else raises ValidationError naming ``checksum``."""
    name, sep, digest = value.partition("=")
    algorithm = ALIASES.get(name.lower(), name.lower())
    if not sep or algorithm not in ALGORITHMS:
        raise ValidationError("checksum", f"must be <algorithm>=<hex> with algorithm one of "
                                          f"{', '.join(ALGORITHMS)} (got {value!r})")
    length = hashlib.new(ALGORITHMS[algorithm]).digest_size * 2
    if len(digest) != length or not _HEX_RE.fullmatch(digest):
        raise ValidationError("checksum", f"{algorithm} needs {length} hex digits (got {len(digest)} characters)")
    return Expected(algorithm, digest.lower())


class Digests:
    """The sha-256 of a body, and its digest by the job's expected algorithm when another."""

    def __init__(self, expected: str = ""):
        self.expected = parse(expected) if expected else None
        self.sha256 = hashlib.sha256()
        self._other: Any = None
        if self.expected is not None and self.expected.algorithm != "sha-256":
            self._other = hashlib.new(ALGORITHMS[self.expected.algorithm])

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self._other is not None:
            self._other.update(chunk)

    def check(self, response_code: int = 0) -> str:
        """The sha-256 in lower-case hex; raises ChecksumMismatch when the expected digest differs."""
        sha256 = self.sha256.hexdigest()
        if self.expected is not None:
            got = sha256 if self._other is None else self._other.hexdigest()
            if got != self.expected.hex:
                raise ChecksumMismatch(str(self.expected), f"{self.expected.algorithm}={got}",
                                       response_code=response_code)
        return sha256


def base64_of_hex(hex_digest: str) -> str:
    """A hex digest as S3's ``ChecksumSHA256`` wants it: base64 of the raw bytes."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")
