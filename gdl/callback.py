"""The callback payload: what a client receives about its job.

Field for field the Go service's payload, so its clients work unchanged::

    {"success": true, "error": "", "extra": "foobar",
     "resource_url": "http://example.com/a.png",
     "download_url": "http://localhost:8000/files/6QE/6QEywYsd0jrKAg",
     "job_id": "6QEywYsd0jrKAg", "response_code": 200,
     "delivered": true, "delivery_error": "", "image_size": "10x10"}

``delivered`` and ``delivery_error`` describe the callback's own delivery,
as in the Go service: a payload being sent is being delivered, so they are
``true`` and ``""`` in every callback, failed downloads included (a Go
client reads ``false`` as "this callback was not delivered"). ``success``
and ``error`` describe the download.
"""

from __future__ import annotations

import json
from typing import Any

from gdl.job import Job


def payload(job: Job, *, download_url: str) -> dict[str, Any]:
    """The callback body of a finished job.

    ``download_url`` is where the stored file is (the job's storage decides:
    :meth:`gdl.filestorage.FileStorages.url_for`); a failed download has none.
    """
    success = job.succeeded
    return {
        "success": success,
        "error": job.status.error,
        "extra": job.extra,
        "resource_url": job.url,
        "download_url": download_url if success else "",
        "job_id": job.id,
        "response_code": job.status.response_code,
        "delivered": True,
        "delivery_error": "",
        "image_size": job.status.image_size,
    }


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
