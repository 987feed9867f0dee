"""The HTTP API: a WSGI app, served by ``gevent.pywsgi`` on the process's hub.

Routes (the Go service's, plus gdl's own)::

    POST /download                  enqueue a job                 201 {"id": ...} | 400 {"error": ...}
                                    (Idempotency-Key: a replay is 201 + Idempotent-Replayed, another body 422)
    POST /download/batch            enqueue up to batch_max_jobs  200 {"jobs": [per item, in order]} | 413
    GET  /hb                        heartbeat                     200 | 503 while heartbeat_path exists
    POST /retry/<id>                re-deliver a failed callback  204 | 400
    DELETE /jobs/<id>               cancel a job                  200 cancelled | 202 cancelling | 409 | 404
    DELETE /aggregations/<id>       purge: cancel what it holds   202 {"aggr_id", "state": "purging", "queued"} | 404
                                    (both: ?callback=false, no callback for the jobs cancelled)
    GET  /dashboard/aggregations    pending aggregations          200 [{"name": "jobs:<aggr>", "size": N}]
    GET  /stats/<component>         summed live counters          200 {...} | 404
    GET  /jobs/<id>                 a job's state and attempts    200 {...} | 404
    GET  /aggregations/<id>         its state, limits, rate       200 {...} | 404
    POST /aggregations/<id>/pause   stop starting its downloads   200 {...}
    POST /aggregations/<id>/resume  start again                   200 {...} | 404
    GET  /metrics                   Prometheus exposition         200
    GET  /files/<id[0:3]>/<id>      a stored file                 200 bytes | 404
    GET  /api/overview              processes, queues, aggregations  200 {...}   (gdl/dashboard.py)
    GET  /api/throughput?minutes=N  10-second buckets, last 15 min   200 {...}
    GET  /api/failures?limit=N      failed downloads and callbacks   200 {...}
    GET  /                          the dashboard page            200 HTML (gdl/static/dashboard.html)

It talks only to the store (and to the file storage for ``/files``). Every
error is JSON ``{"error": ...}``; a Redis outage is a 503, never a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from gevent.pywsgi import WSGIHandler, WSGIServer

from gdl import __version__, dashboard, destinations, idempotency, metrics, reuse, sentry
from gdl.config import Config
from gdl.errors import StoreUnavailable, ValidationError
from gdl.filestorage import FileStorage
from gdl.job import CANCELLING, ID_LENGTH, Job, JobState, is_valid_id, new_id, new_ids
from gdl.netguard import AddressGuard
from gdl.stats import STALE_AFTER_INTERVALS, summed
from gdl.store import Enqueued, EnqueueOutcome, Idempotency, Store, now_ms
from gdl.store.aggregations import idle_view
from gdl.submission import check_aggr_id, parse_request

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Response = tuple[str, list[tuple[str, str]], Iterable[bytes]]

COMPONENTS = ("processor", "notifier")
FILE_CHUNK = 256 * 1024
# A stored file is whatever a job's URL answered, served from the dashboard's origin (where a
# typed-in API token is kept): browsers must not sniff it into something else, nor run it.
FILE_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", "sandbox; default-src 'none'")]

_STATUS = {200: "200 OK", 201: "201 Created", 202: "202 Accepted", 204: "204 No Content", 400: "400 Bad Request",
           401: "401 Unauthorized", 404: "404 Not Found", 405: "405 Method Not Allowed", 409: "409 Conflict",
           411: "411 Length Required", 413: "413 Payload Too Large", 422: "422 Unprocessable Content",
           503: "503 Service Unavailable",
           500: "500 Internal Server Error"}


class NoDelayHandler(WSGIHandler):
    """pywsgi's handler with Nagle off, and no access-log line formatted for nobody.

    pywsgi sends the headers and the body in two writes; with Nagle on, the
    body of every response after the first on a keep-alive connection waits
    for the client's delayed ACK (40 ms on Linux).
    """

    def log_request(self) -> None:
        # With log=None pywsgi still formats each line, then drops it (measured:
        # 2.5% of the API's CPU on enqueues).
        if self.server.access_log:
            super().log_request()

    def handle(self) -> None:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a unix socket): nothing to turn off
        super().handle()


def make_server(address: tuple[str, int], app: Callable, **kwargs: Any) -> WSGIServer:
    """A pywsgi server with :class:`NoDelayHandler`; ``log=None`` turns the access log off."""
    server = WSGIServer(address, app, handler_class=NoDelayHandler, **kwargs)
    server.access_log = kwargs.get("log", "default") is not None
    return server


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json(status: int, body: Any) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    return _STATUS[status], [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], [data]


def _text(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = text.encode()
    return _STATUS[status], [("Content-Type", content_type), ("Content-Length", str(len(data)))], [data]


def _empty(status: int) -> Response:
    return _STATUS[status], [("Content-Length", "0")], []


class API:
    """The WSGI application. ``clock`` is injectable for tests."""

    def __init__(self, cfg: Config, store: Store, storage: FileStorage | None,
                 clock: Callable[[], int] = now_ms):
        self.cfg = cfg
        self.store = store
        self.storage = storage
        self.clock = clock
        self.tokens = [t.encode() for t in cfg.security.api_tokens]
        self.guard = AddressGuard.from_config(cfg.security)  # refuses literal private destinations at submit
        self.stale_ms = int(cfg.processor.stats_interval * 1000 * STALE_AFTER_INTERVALS)
        self.routes: list[tuple[str, re.Pattern, Callable[..., Response]]] = [
            ("POST", re.compile(r"^/download$"), self.post_download),
            ("POST", re.compile(r"^/download/batch$"), self.post_download_batch),
            ("GET", re.compile(r"^/hb$"), self.get_heartbeat),
            ("POST", re.compile(r"^/retry/([^/]*)$"), self.post_retry),  # an empty id is a 400, not a 404
            ("DELETE", re.compile(r"^/jobs/([^/]+)$"), self.delete_job),
            ("DELETE", re.compile(r"^/aggregations/([^/]+)$"), self.delete_aggregation),
            ("GET", re.compile(r"^/dashboard/aggregations$"), self.get_aggregations),
            ("GET", re.compile(r"^/stats/([^/]+)$"), self.get_stats),
            ("GET", re.compile(r"^/jobs/([^/]+)$"), self.get_job),
            ("GET", re.compile(r"^/aggregations/([^/]+)$"), self.get_aggregation),
            ("POST", re.compile(r"^/aggregations/([^/]+)/pause$"), self.post_pause),
            ("POST", re.compile(r"^/aggregations/([^/]+)/resume$"), self.post_resume),
            ("GET", re.compile(r"^/metrics$"), self.get_metrics),
            ("GET", re.compile(r"^/files/([^/]+)/([^/]+)$"), self.get_file),
            ("GET", re.compile(r"^/api/overview$"), self.get_overview),
            ("GET", re.compile(r"^/api/throughput$"), self.get_throughput),
            ("GET", re.compile(r"^/api/failures$"), self.get_failures),
            ("GET", re.compile(r"^/$"), self.get_index),
        ]
        # The page holds no data (it reads the JSON endpoints, sending a token when one is
        # typed in), so it loads even when api_tokens_read guards every GET.
        self.public = {self.get_index}
        self.index_html = INDEX_HTML.replace("{version}", __version__)

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, body = self.dispatch(environ)
        start_response(status, headers)
        return body

    def dispatch(self, environ: dict) -> Response:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "/")
        allowed: list[str] = []
        for route_method, pattern, handler in self.routes:
            match = pattern.match(path)
            if not match:
                continue
            if route_method != method and not (route_method == "GET" and method == "HEAD"):
                allowed += [route_method, "HEAD"] if route_method == "GET" else [route_method]
                continue
            try:
                if handler not in self.public:
                    self._authorize(environ, method)
                return handler(environ, *match.groups())
            except HTTPError as err:
                return _json(err.status, {"error": str(err)})
            except ValidationError as err:
                return _json(400, {"error": str(err)})
            except StoreUnavailable as err:  # the store logs the outage once; each refusal is a detail
                log.debug("api: %s %s: redis unavailable: %s", method, path, err)
                return _json(503, {"error": "storage unavailable, try again"})
            except Exception as exc:
                log.exception("api: %s %s: unexpected error", method, path)
                sentry.report(exc, component="api")
                return _json(500, {"error": "internal error"})
        if allowed:
            status, headers, body = _json(405, {"error": f"method {method} not allowed on {path}"})
            return status, [*headers, ("Allow", ", ".join(allowed))], body  # RFC 9110: a 405 names them
        return _json(404, {"error": f"no such endpoint: {path}"})

    def _authorize(self, environ: dict, method: str) -> None:
        if not self.tokens or (method in ("GET", "HEAD") and not self.cfg.security.api_tokens_read):
            return
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), t) for t in self.tokens):
            return
        raise HTTPError(401, "missing or invalid bearer token")

    # ------------------------------------------------------------------ writes

    def post_download(self, environ: dict) -> Response:
        body = self._read_json(environ)
        raw_key = environ.get("HTTP_IDEMPOTENCY_KEY")
        key = idempotency.parse_key(raw_key) if raw_key is not None else None
        now = self.clock()
        job = self._job(body, now)
        check = idempotency.idempotency(key, body, scope=self._scope(environ), ttl=self.cfg.api.idempotency_ttl)
        [enqueued] = self.store.enqueue_many([(job, check)], now=now)
        if enqueued.outcome is EnqueueOutcome.CONFLICT:
            raise HTTPError(422, _conflict(enqueued.job_id))
        if enqueued.outcome is EnqueueOutcome.REPLAYED:
            status, headers, data = _json(201, {"id": enqueued.job_id, "state": self._state(enqueued.job_id)})
            return status, [*headers, ("Idempotent-Replayed", "true")], data
        log.info("job %s: accepted for aggr %s: %s", job.id, job.aggr_id, job.url)
        return _json(201, {"id": job.id})

    def post_download_batch(self, environ: dict) -> Response:
        """Up to ``api.batch_max_jobs`` jobs, each validated on its own; per-item results in input order."""
        body = self._read_json(environ)
        items = body.get("jobs") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ValidationError("jobs", "must be a list of jobs")
        most = self.cfg.api.batch_max_jobs
        if len(items) > most:
            raise HTTPError(413, f"jobs: {len(items)} jobs, more than api.batch_max_jobs ({most}); nothing enqueued")
        now = self.clock()
        scope = self._scope(environ)
        results: list[dict] = [{} for _ in items]
        valid: list[tuple[int, Job, Idempotency | None]] = []
        for index, (item, job_id) in enumerate(zip(items, new_ids(len(items)))):
            try:
                valid.append((index, *self._batch_item(item, job_id, scope, now)))
            except ValidationError as err:
                results[index] = {"index": index, "status": 400, "error": str(err)}
        enqueued = self.store.enqueue_many([(job, check) for _, job, check in valid], now=now)
        for (index, _, _), outcome in zip(valid, enqueued):
            results[index] = _batch_result(index, outcome)
        accepted = sum(1 for r in results if r["status"] == 201)
        log.info("api: batch of %d job(s): %d accepted, %d refused", len(items), accepted, len(items) - accepted)
        return _json(200, {"jobs": results})

    def _batch_item(self, item: Any, job_id: str, scope: str, now: int) -> tuple[Job, Idempotency | None]:
        if not isinstance(item, dict):
            raise ValidationError("job", "must be a JSON object")
        raw_key = item.get("idempotency_key")
        if raw_key is not None and not isinstance(raw_key, str):
            raise ValidationError("idempotency_key", "must be a string")
        key = idempotency.parse_key(raw_key, "idempotency_key") if raw_key is not None else None
        body = {k: v for k, v in item.items() if k != "idempotency_key"} if raw_key is not None else item
        job = self._job(body, now, job_id)
        return job, idempotency.idempotency(key, body, scope=scope, ttl=self.cfg.api.idempotency_ttl)

    def _job(self, body: Any, now: int, job_id: str | None = None) -> Job:
        """A validated job from a request body (a ValidationError names the field)."""
        job = parse_request(body, job_id=job_id or new_id(), now_ms=now)
        reuse.check_ttl(job, self.cfg.processor.reuse_max_ttl)
        destinations.check(job, body, self.guard)
        return job

    def _scope(self, environ: dict) -> str:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        return idempotency.scope_of(token.strip() if scheme.lower() == "bearer" else "")

    def _state(self, job_id: str) -> str:
        job = self.store.get_job(job_id)
        return job.status.state if job is not None else "deleted"

    def post_retry(self, environ: dict, job_id: str) -> Response:
        if not job_id:
            raise HTTPError(400, "job id: missing (POST /retry/<job id>)")
        self._check_id(job_id, 400)
        result = self.store.retry_failed_callback(job_id, now=self.clock())
        if result == 0:
            raise HTTPError(400, f"job {job_id} does not exist")
        if result < 0:
            raise HTTPError(400, f"job {job_id}: callback has not failed")
        log.info("job %s: failed callback queued again by request", job_id)
        return _empty(204)

    def post_pause(self, environ: dict, aggr_id: str) -> Response:
        aggr_id = check_aggr_id(aggr_id)
        self.store.pause_aggregation(aggr_id)
        log.info("aggr %s: paused by request", aggr_id)
        return self.get_aggregation(environ, aggr_id)

    def post_resume(self, environ: dict, aggr_id: str) -> Response:
        aggr_id = check_aggr_id(aggr_id)
        ttl_ms = int(self.cfg.processor.aggr_state_ttl * 1000)
        if not self.store.resume_aggregation(aggr_id, now=self.clock(), state_ttl_ms=ttl_ms):
            raise HTTPError(404, f"aggregation {aggr_id} is unknown")
        log.info("aggr %s: resumed by request", aggr_id)
        # A pause of an aggregation that never had a job leaves no record once resumed.
        view = self.store.aggregation(aggr_id, now=self.clock())
        return _json(200, (view or idle_view(aggr_id)).public())

    def delete_job(self, environ: dict, job_id: str) -> Response:
        self._check_id(job_id, 404)
        now = self.clock()
        state = self.store.cancel_job(job_id, now=now, forget_at=now + self.cfg.notifier.deletion_delay_ms,
                                      callback=_query_bool(environ, "callback"))
        if state == "unknown":
            raise HTTPError(404, f"job {job_id} does not exist")
        if state in (JobState.CANCELLED, CANCELLING):
            log.info("job %s: %s by request", job_id, state)
            return _json(200 if state == JobState.CANCELLED else 202, {"id": job_id, "state": state})
        return _json(409, {"error": f"job {job_id} already finished: {state}", "state": state})

    def delete_aggregation(self, environ: dict, aggr_id: str) -> Response:
        aggr_id = check_aggr_id(aggr_id)
        purge = self.store.purge_aggregation(aggr_id, now=self.clock(), callback=_query_bool(environ, "callback"))
        if not purge.known:
            raise HTTPError(404, f"aggregation {aggr_id} is unknown (no job queued or in flight)")
        log.info("aggr %s: purge by request: %d queued job(s), %d in flight", aggr_id, purge.queued, purge.in_flight)
        return _json(202, {"aggr_id": aggr_id, "state": "purging", "queued": purge.queued})

    def _read_json(self, environ: dict) -> Any:
        limit = self.cfg.api.max_body_bytes
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            try:
                size = int(length)
            except ValueError as exc:
                raise HTTPError(400, "Content-Length is not a number") from exc
            if size > limit:
                raise HTTPError(413, f"body larger than {limit} bytes")
            raw = environ["wsgi.input"].read(size)
        else:
            raw = environ["wsgi.input"].read(limit + 1)
            if len(raw) > limit:
                raise HTTPError(413, f"body larger than {limit} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValidationError("body", f"is not valid JSON: {exc}") from exc

    # ------------------------------------------------------------------ reads

    def get_heartbeat(self, environ: dict) -> Response:
        if os.path.exists(self.cfg.api.heartbeat_path):
            return _text(503, "Service Unavailable")
        return _text(200, "OK")

    def get_aggregations(self, environ: dict) -> Response:
        return _json(200, [{"name": f"jobs:{aggr}", "size": size} for aggr, size in self.store.pending_aggregations()])

    def get_stats(self, environ: dict, component: str) -> Response:
        if component not in COMPONENTS:
            raise HTTPError(404, f"no stats for {component!r}")
        reports = self.store.reports(component, newer_than=self.clock() - self.stale_ms)
        if not reports:
            raise HTTPError(404, f"no {component} has reported stats")
        return _json(200, summed(reports))

    def get_job(self, environ: dict, job_id: str) -> Response:
        self._check_id(job_id, 404)
        job = self.store.get_job(job_id)
        if job is None:
            raise HTTPError(404, f"job {job_id} does not exist")
        body = job.public()
        body["attempts_log"] = self.store.job_log(job_id)
        return _json(200, body)

    def get_aggregation(self, environ: dict, aggr_id: str) -> Response:
        aggr_id = check_aggr_id(aggr_id)
        view = self.store.aggregation(aggr_id, now=self.clock())
        if view is None:
            raise HTTPError(404, f"aggregation {aggr_id} is unknown (never seen, or forgotten)")
        return _json(200, view.public())

    def get_metrics(self, environ: dict) -> Response:
        now = self.clock()
        reports = {c: self.store.reports(c, newer_than=now - self.stale_ms) for c in COMPONENTS}
        text = metrics.exposition(reports, self.store.queue_depths(), self.store.shaping_records(now=now),
                                  self.store.cancel_counts())
        return _STATUS[200], [("Content-Type", metrics.CONTENT_TYPE), ("Content-Length", str(len(text)))], [text]

    def get_file(self, environ: dict, prefix: str, job_id: str) -> Response:
        if not is_valid_id(job_id) or prefix != job_id[:3] or self.storage is None:
            raise HTTPError(404, "no such file")
        handle = self.storage.open(job_id)
        if handle is None:
            raise HTTPError(404, "no such file")
        size = os.fstat(handle.fileno()).st_size
        headers = [("Content-Type", self._file_type(job_id)), ("Content-Length", str(size)), *FILE_HEADERS]
        if environ["REQUEST_METHOD"] == "HEAD":
            handle.close()
            return _STATUS[200], headers, []
        wrapper = environ.get("wsgi.file_wrapper")
        body = wrapper(handle, FILE_CHUNK) if wrapper else _chunks(handle)
        return _STATUS[200], headers, body

    def _file_type(self, job_id: str) -> str:
        """The type the job's download was sniffed as (with ``mime_type`` or ``extract_image_size``),
        else ``application/octet-stream``; a file outlives neither Redis nor its record, but it is
        served the same while Redis is away."""
        try:
            job = self.store.get_job(job_id)
        except StoreUnavailable:
            job = None
        return (job.status.mime if job is not None else "") or "application/octet-stream"

    def get_index(self, environ: dict) -> Response:
        return _text(200, self.index_html, "text/html; charset=utf-8")

    def get_overview(self, environ: dict) -> Response:
        return _json(200, dashboard.overview(self.store, self.clock()))

    def get_throughput(self, environ: dict) -> Response:
        minutes = _query_int(environ, "minutes", dashboard.THROUGHPUT_MINUTES, 1, dashboard.THROUGHPUT_MINUTES)
        return _json(200, dashboard.throughput(self.store, self.clock(), minutes=minutes))

    def get_failures(self, environ: dict) -> Response:
        return _json(200, dashboard.failures(self.store, limit=_query_int(environ, "limit", 50, 1, 100)))

    def _check_id(self, job_id: str, status: int) -> None:
        if not is_valid_id(job_id):
            raise HTTPError(status, f"{job_id!r} is not a job id ({ID_LENGTH} letters and digits)")


def _conflict(job_id: str) -> str:
    return (f"{idempotency.HEADER}: already used with another request body (job {job_id}); "
            "a key is kept api.idempotency_ttl seconds")


def _batch_result(index: int, enqueued: Enqueued) -> dict:
    if enqueued.outcome is EnqueueOutcome.CONFLICT:
        return {"index": index, "status": 422, "error": _conflict(enqueued.job_id)}
    result = {"index": index, "status": 201, "id": enqueued.job_id}
    if enqueued.outcome is EnqueueOutcome.REPLAYED:
        result["replayed"] = True
    return result


def _chunks(handle: Any) -> Iterable[bytes]:
    with handle:
        while chunk := handle.read(FILE_CHUNK):
            yield chunk


def _query_int(environ: dict, name: str, default: int, low: int, high: int) -> int:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError as exc:
        raise HTTPError(400, f"{name}: must be a whole number") from exc
    if not low <= value <= high:
        raise HTTPError(400, f"{name}: must be between {low} and {high}")
    return value


def _query_bool(environ: dict, name: str, default: bool = True) -> bool:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    if not values:
        return default
    if values[0] not in ("true", "false"):
        raise HTTPError(400, f"{name}: must be true or false")
    return values[0] == "true"


# The dashboard: one self-contained page (inline CSS and JS, no CDN) reading /api/*.
INDEX_HTML = resources.files("gdl").joinpath("static", "dashboard.html").read_text()
