"""Job ids: 14 characters of ``[A-Za-z0-9]`` (about 83 bits), drawn from the
OS's randomness, each as likely as any other; and the check of one."""

from __future__ import annotations

import re
import secrets
import string

ID_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 14
ID_RE = re.compile(rf"^[A-Za-z0-9]{{{ID_LENGTH}}}$")

# A random byte below 248 (4 x 62) is a character, the byte modulo 62, each of the 62 as
# likely as any other; the 8 bytes above would favour the first 8 characters, so they are
# dropped and others read in their place. An id is 14 such characters: every id is as
# likely as any other, about 83 bits, and the whole draw is two C calls (read, translate).
_KEPT = 4 * len(ID_ALPHABET)
_CHARACTER_OF_BYTE = bytes(ord(ID_ALPHABET[b % len(ID_ALPHABET)]) for b in range(256))
_DROPPED_BYTES = bytes(range(_KEPT, 256))


def new_id() -> str:
    """14 random characters of ``[A-Za-z0-9]`` (about 83 bits), from one read of the OS's randomness."""
    return _characters(ID_LENGTH)


def new_ids(count: int) -> list[str]:
    """``count`` ids, each as :func:`new_id` draws it, from one read of the OS's
    randomness for them all (a batch's ids; a read costs more than the rest)."""
    chars = _characters(ID_LENGTH * count)
    return [chars[start:start + ID_LENGTH] for start in range(0, len(chars), ID_LENGTH)]


def _characters(count: int) -> str:
    """``count`` independent random characters of the id alphabet."""
    out = b""
    while len(out) < count:
        # A 32nd of the bytes is dropped on average: read a 16th more (and a few) so that
        # a second read is rare.
        raw = secrets.token_bytes(count - len(out) + (count >> 4) + 8)
        out += raw.translate(_CHARACTER_OF_BYTE, _DROPPED_BYTES)
    return out[:count].decode("ascii")


def is_valid_id(value: str) -> bool:
    return bool(ID_RE.fullmatch(value))  # fullmatch: ``$`` alone also matches before a final newline
