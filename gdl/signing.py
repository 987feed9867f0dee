"""Signed callbacks: Standard Webhooks v1 (https://www.standardwebhooks.com/).

With ``notifier.signing_secrets`` set, every callback attempt carries three
headers (HTTP headers, or Kafka record headers): ``webhook-id`` (``msg_<job
id>``, the same on every retry and re-delivery, so a receiver can drop
duplicates), ``webhook-timestamp`` (this attempt's Unix seconds) and
``webhook-signature``: one ``v1,<base64 HMAC-SHA256>`` entry per secret,
space-separated, over ``"<id>.<timestamp>.<body>"``. All secrets sign, so
a receiver holding any one of them verifies while secrets are rotated.

A secret is ``whsec_`` + strict base64 of 24 to 64 random bytes;
:func:`parse_secrets` checks them at load and names the key, never the value.
:class:`Signer` keeps only the decoded keys and has no ``repr`` that shows them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from gdl.errors import ConfigError

PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
NEW_KEY_BYTES = 32  # what ``gdl keys new`` draws


def decode_secret(secret: object, key: str) -> bytes:
    """The key bytes of one ``whsec_`` secret; ConfigError naming ``key`` (never the secret) if malformed."""
    if not isinstance(secret, str) or not secret.startswith(PREFIX):
        raise ConfigError(f"{key}: must start with {PREFIX} (see gdl keys new)")
    try:
        raw = base64.b64decode(secret[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{key}: is not {PREFIX} followed by base64") from None  # the cause quotes the text
    if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
        raise ConfigError(f"{key}: must encode {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes (has {len(raw)})")
    return raw


def parse_secrets(values: Sequence[object], key: str = "notifier.signing_secrets") -> list[bytes]:
    return [decode_secret(value, f"{key}[{n}]") for n, value in enumerate(values)]


def new_secret() -> str:
    """A fresh secret, as ``gdl keys new`` prints it."""
    return PREFIX + base64.b64encode(secrets.token_bytes(NEW_KEY_BYTES)).decode("ascii")


def message_id(job_id: str) -> str:
    """The ``webhook-id`` of a job's callback: gdl ids are alphanumeric, so it has no ``.``."""
    return f"msg_{job_id}"


class Signer:
    """Signs callback bodies with every configured key (none: no headers at all)."""

    def __init__(self, keys: Sequence[bytes]):
        self._keys = tuple(keys)

    @classmethod
    def from_secrets(cls, values: Sequence[object]) -> Signer:
        return cls(parse_secrets(values))

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} key(s))"

    def __bool__(self) -> bool:
        return bool(self._keys)

    def headers(self, job_id: str, body: bytes, *, now_ms: int) -> list[tuple[str, str]]:
        """The three headers for one attempt, at ``now_ms``, sending exactly ``body``; [] without keys."""
        if not self._keys:
            return []
        msg_id = message_id(job_id)
        signed = f"{msg_id}.{now_ms // 1000}.".encode() + body
        signature = " ".join(
            "v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode("ascii")
            for k in self._keys)
        return [("webhook-id", msg_id), ("webhook-timestamp", str(now_ms // 1000)), ("webhook-signature", signature)]


NO_SIGNER = Signer(())
