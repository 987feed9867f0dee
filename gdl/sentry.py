"""Error reporting to Sentry, when ``sentry.dsn`` is set.

Events are sent explicitly with :func:`report`, tagged with the component,
aggregation and job they concern: unexpected exceptions (bugs, library
surprises), internal failures (our disk, our storage) and crashed greenlets.
Expected download failures (a 404, a mime mismatch) are ordinary log lines
and never reach Sentry. Log lines become breadcrumbs of the next event.

sentry-sdk sends from a background thread; with gevent's monkey patching
(done first thing by :mod:`gdl.cli`) that thread is a greenlet on the hub,
so reporting never blocks a worker.
"""

from __future__ import annotations

import logging

from gdl import __version__
from gdl.config import SentryConfig

log = logging.getLogger(__name__)

_enabled = False


def setup(cfg: SentryConfig, component: str) -> bool:
    global _enabled
    if not cfg.dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=cfg.dsn,
        release=cfg.release or f"gdl@{__version__}",
        environment=cfg.environment or None,
        # Events come from report() with their tags; logging only leaves breadcrumbs.
        integrations=[LoggingIntegration(level=logging.INFO, event_level=None)],
        default_integrations=True,
        send_default_pii=False,
    )
    sentry_sdk.set_tag("component", component)
    _enabled = True
    log.info("sentry: reporting errors")
    return True


def report(exc: BaseException, *, component: str, aggr_id: str = "", job_id: str = "") -> None:
    """Send ``exc`` to Sentry with gdl's tags (no-op when Sentry is off)."""
    if not _enabled:
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("component", component)
        if aggr_id:
            scope.set_tag("aggr_id", aggr_id)
        if job_id:
            scope.set_tag("job_id", job_id)
        sentry_sdk.capture_exception(exc)


def flush(timeout: float = 2.0) -> None:
    if _enabled:
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout)
