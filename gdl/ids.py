"""Job ids: 14 characters of ``[A-Za-z0-9]`` (about 83 bits), drawn from the
OS's randomness, each as likely as any other; and the check of one."""

from __future__ import annotations

import re
import secrets
import string

ID_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 14
ID_RE = re.compile(rf"^[A-Za-z0-9]{{{ID_LENGTH}}}$")

_ID_SPACE = len(ID_ALPHABET) ** ID_LENGTH
_ID_BITS = _ID_SPACE.bit_length()  # 84: a draw of this many bits is an id about four times in five
_ID_BYTES = -(-_ID_BITS // 8)
# Two base-62 digits at once: pair p is digit p % 62 then digit p // 62, as two divmods by 62 give them.
_ID_PAIRS = [ID_ALPHABET[p % len(ID_ALPHABET)] + ID_ALPHABET[p // len(ID_ALPHABET)]
             for p in range(len(ID_ALPHABET) ** 2)]


def new_id() -> str:
    """14 random characters of ``[A-Za-z0-9]`` (about 83 bits), from one draw of
    the OS's randomness rather than one per character."""
    return _id_of(secrets.randbelow(_ID_SPACE))


def new_ids(count: int) -> list[str]:
    """``count`` ids, each as :func:`new_id` draws it, from one read of the OS's
    randomness for them all (a batch's ids; a read costs more than the rest)."""
    raw = secrets.token_bytes(_ID_BYTES * count)
    mask = (1 << _ID_BITS) - 1
    ids = []
    for start in range(0, len(raw), _ID_BYTES):
        number = int.from_bytes(raw[start:start + _ID_BYTES], "big") & mask
        # Rejection keeps every id equally likely: a draw past the id space is drawn again.
        ids.append(_id_of(number) if number < _ID_SPACE else new_id())
    return ids


def _id_of(number: int) -> str:
    """``number`` in base 62, least significant digit first, two digits at a time."""
    pairs = []
    for _ in range(ID_LENGTH // 2):
        number, pair = divmod(number, len(_ID_PAIRS))
        pairs.append(_ID_PAIRS[pair])
    return "".join(pairs)


def is_valid_id(value: str) -> bool:
    return bool(ID_RE.fullmatch(value))  # fullmatch: ``$`` alone also matches before a final newline
