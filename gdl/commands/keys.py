"""``gdl keys new``: print a fresh callback signing secret (``whsec_...``) for
``notifier.signing_secrets``. Nothing is stored or sent anywhere."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gdl.commands import EXIT_OK

if TYPE_CHECKING:
    from gdl.config import Config


def run(name: str, args: argparse.Namespace, cfg: Config) -> int:
    from gdl import signing

    print(signing.new_secret())
    return EXIT_OK
