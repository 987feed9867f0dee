"""Error reporting to Sentry, when ``sentry.dsn`` is set.

Unexpected exceptions (logged with ``log.exception`` or escaping a greenlet)
become Sentry events; expected download failures are ordinary info lines and
never reach Sentry.
"""

from __future__ import annotations

import logging

from gdl import __version__
from gdl.config import SentryConfig

log = logging.getLogger(__name__)


def setup(cfg: SentryConfig, component: str) -> bool:
    if not cfg.dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=cfg.dsn,
        release=cfg.release or f"gdl@{__version__}",
        environment=cfg.environment or None,
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        send_default_pii=False,
    )
    sentry_sdk.set_tag("component", component)
    log.info("sentry: reporting errors")
    return True
