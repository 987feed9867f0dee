"""gdl's HTTP engines behind one seam (:mod:`gdl.http.base`).

``http.engine`` picks one for the process: ``curl`` (libcurl through
pycurl, the default) or ``requests``. Downloads (:mod:`gdl.download`) and
HTTP callbacks (:mod:`gdl.backends.http`) both go through :func:`make_engine`.
The engines' modules are imported on first use, so a platform without
pycurl still runs the requests engine.
"""

from __future__ import annotations

import importlib
from typing import Any

from gdl.http.base import Engine, Exchange, Headers, Response

__all__ = ["DEFAULT_ENGINE", "ENGINES", "Engine", "Exchange", "Headers", "Response", "availability", "make_engine",
           "unavailable"]

DEFAULT_ENGINE = "curl"
# Engine name -> (module, class, what provides it).
ENGINES = {
    "curl": ("gdl.http.curl", "CurlEngine", "pycurl"),
    "requests": ("gdl.http.requests", "RequestsEngine", "requests"),
}


def make_engine(name: str, **options: Any) -> Engine:
    """A new engine ``name`` (``guard``, ``pool_size``, ``hosts``, ``ca_bundle``: see :class:`Engine`)."""
    module, cls, _ = ENGINES[name]
    engine: Engine = getattr(importlib.import_module(module), cls)(**options)
    return engine


def unavailable(name: str) -> str | None:
    """Why engine ``name`` cannot run here (its library does not import), or None when it can."""
    module, _, package = ENGINES[name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{package} cannot be imported ({exc})"
    return None


def availability() -> str:
    """Each engine and whether it can run, for ``gdl --version``:
    ``curl available (libcurl 8.5.0), requests available``."""
    parts = []
    for name in ENGINES:
        why = unavailable(name)
        if why is not None:
            parts.append(f"{name} unavailable: {why}")
        elif name == "curl":
            from gdl.http.curl import libcurl_version

            parts.append(f"curl available (libcurl {libcurl_version()})")
        else:
            import requests

            parts.append(f"requests available (requests {requests.__version__})")
    return ", ".join(parts)
