"""Resume after a broken transfer (issue 20): ``Range`` + ``If-Range`` on the retry.

The download-level tests run on both HTTP engines (the ``engine`` fixture)
against a loopback origin (the ``files`` fixture) that cuts a body, honours or ignores ``Range``,
answers a wrong range or a 416, and changes its ETag (tests/httpserver.py);
then the service end to end: a 4 MiB body dropped at 60 %.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os

import pytest

from gdl import resume
from gdl.download import Downloader
from gdl.errors import HTTPStatusError, MimeMismatch, TooLarge, TruncatedBody
from gdl.job import Job, new_id
from tests.conftest import wait_until
from tests.httpserver import Route
from tests.samples import image_bytes

MIB = 1024 * 1024
SIZE = 4 * MIB
BODY = hashlib.sha256(b"v1").digest() * (SIZE // 32)  # 4 MiB that only this test gives
CUT = int(SIZE * 0.6)
ETAG = '"v1"'
DATE = "Sat, 05 Dec 2026 10:00:00 GMT"


@pytest.fixture
def scratch(tmp_path) -> str:
    (tmp_path / "partial").mkdir()
    return str(tmp_path / "partial")


@pytest.fixture
def downloader(scratch, engine):
    made = Downloader(proxy="", default_headers={"User-Agent": "gdl-test/1"}, scratch_dir=scratch,
                      chunk_size=64 * 1024, engine=engine, resume_min_bytes=MIB)
    yield made
    made.close()


def make_job(url: str, **fields) -> Job:
    return Job(id=new_id(), url=url, aggr_id="aggr", aggr_limit=1, **fields)


def cut_then(second: Route, headers: dict[str, str] | None = None) -> list[Route]:
    """A first answer that drops the connection at 60 %, then ``second`` for every later request."""
    return [Route(body=BODY, headers=dict(headers or {"ETag": ETAG}), cut_after=CUT), second]


def broken_attempt(downloader: Downloader, job: Job) -> resume.Partial | None:
    """Run the first attempt (it breaks), record what it kept on ``job`` as the store would."""
    with pytest.raises(TruncatedBody) as info:
        downloader.fetch(job, timeout=10)
    kept = info.value.attempt.kept
    if kept is not None:
        for name, value in kept.fields().items():
            setattr(job.status, name, value)
    return kept


def retry(downloader: Downloader, job: Job):
    return downloader.fetch(job, timeout=10, partial=resume.usable(job))


def stored(fetched) -> bytes:
    with open(fetched.path, "rb") as file:
        return file.read()


# --------------------------------------------------------------------------- the rules, unit


@pytest.mark.parametrize(("headers", "validator"), [
    ({"ETag": '"abc"'}, '"abc"'),
    ({"ETag": 'W/"abc"', "Last-Modified": DATE}, ""),  # a weak ETag: and no date either (RFC 9110 13.1.5)
    ({"Last-Modified": DATE}, DATE),
    ({"Last-Modified": DATE, "Content-Encoding": "gzip"}, ""),
    ({}, ""),
])
def test_only_a_strong_validator_may_go_in_if_range(headers, validator) -> None:
    from gdl.http import Headers

    assert resume.strong_validator(Headers(list(headers.items()))) == validator


@pytest.mark.parametrize(("value", "span"), [
    ("bytes 100-199/200", (100, 199, 200)), ("bytes 0-9/*", (0, 9, None)), ("bytes */200", None),
    ("bytes 9-1/200", None), ("", None), (None, None),
])
def test_content_range_is_read_strictly(value, span) -> None:
    assert resume.content_range(value) == span


def test_a_partial_file_on_another_host_or_of_another_size_is_not_used(tmp_path) -> None:
    path = tmp_path / "j.part"
    path.write_bytes(b"x" * 10)
    job = make_job("http://e.com/a")
    job.status.partial_path, job.status.partial_bytes, job.status.partial_validator = str(path), 10, ETAG
    job.status.partial_host = "another-host"
    assert resume.usable(job) is None and path.exists()  # not ours to remove
    job.status.partial_host = resume.HOST
    assert resume.usable(job) == resume.Partial(str(path), 10, ETAG)
    job.status.partial_bytes = 12  # the file is not what was recorded: from zero, and it goes
    assert resume.usable(job) is None and not path.exists()


# --------------------------------------------------------------------------- on both engines


def test_the_retry_asks_for_the_rest_and_the_file_is_whole(files, downloader, scratch) -> None:
    files.add_sequence("/big", cut_then(Route(body=BODY, headers={"ETag": ETAG}, ranges="honour")))
    job = make_job(files.url("/big"))
    kept = broken_attempt(downloader, job)
    assert kept is not None and MIB <= kept.size <= CUT
    assert os.path.getsize(kept.path) == kept.size

    fetched = retry(downloader, job)
    second = files.requests_for("/big")[1].headers
    assert (second["Range"], second["If-Range"]) == (f"bytes={kept.size}-", ETAG)
    assert (fetched.response_code, fetched.attempt.resumed_bytes, fetched.size) == (206, kept.size, SIZE)
    assert stored(fetched) == BODY
    assert fetched.attempt.sha256 == hashlib.sha256(BODY).hexdigest()  # over the kept prefix too
    assert files.body_bytes["/big"] < 1.7 * SIZE  # CUT + the rest, not CUT + the whole


def test_a_last_modified_date_without_content_coding_is_a_validator(files, downloader) -> None:
    files.add_sequence("/big", cut_then(Route(body=BODY, headers={"Last-Modified": DATE}, ranges="honour"),
                                         headers={"Last-Modified": DATE}))
    job = make_job(files.url("/big"))
    kept = broken_attempt(downloader, job)
    fetched = retry(downloader, job)
    assert files.requests_for("/big")[1].headers["If-Range"] == DATE
    assert (fetched.attempt.resumed_bytes, stored(fetched)) == (kept.size, BODY)


def test_an_origin_that_ignores_range_replaces_the_partial_file(files, downloader, scratch) -> None:
    files.add_sequence("/big", cut_then(Route(body=BODY, headers={"ETag": ETAG}, ranges="ignore")))
    job = make_job(files.url("/big"))
    kept = broken_attempt(downloader, job)
    fetched = retry(downloader, job)
    assert "Range" in files.requests_for("/big")[1].headers
    assert (fetched.response_code, fetched.attempt.resumed_bytes, stored(fetched)) == (200, 0, BODY)
    assert os.listdir(scratch) == [os.path.basename(fetched.path)] and not os.path.exists(kept.path)


def test_a_changed_etag_gives_the_new_content_whole(files, downloader) -> None:
    new = hashlib.sha256(b"v2").digest() * (SIZE // 32)
    files.add_sequence("/big", cut_then(Route(body=new, headers={"ETag": '"v2"'}, ranges="honour")))
    job = make_job(files.url("/big"))
    broken_attempt(downloader, job)
    fetched = retry(downloader, job)
    assert files.requests_for("/big")[1].headers["If-Range"] == ETAG
    assert (fetched.response_code, fetched.attempt.resumed_bytes, fetched.attempt.etag) == (200, 0, '"v2"')
    assert stored(fetched) == new
    assert fetched.attempt.sha256 == hashlib.sha256(new).hexdigest()


@pytest.mark.parametrize("answer", ["wrong-start", "416"])
def test_a_wrong_range_or_a_416_restarts_without_range_in_the_same_attempt(files, downloader, answer) -> None:
    files.add_sequence("/big", cut_then(Route(body=BODY, headers={"ETag": ETAG}, ranges=answer)))
    job = make_job(files.url("/big"))
    broken_attempt(downloader, job)
    fetched = retry(downloader, job)
    asked = files.requests_for("/big")
    assert len(asked) == 3 and "Range" in asked[1].headers and "Range" not in asked[2].headers
    assert (fetched.response_code, fetched.attempt.resumed_bytes, stored(fetched)) == (200, 0, BODY)


@pytest.mark.parametrize("headers", [{}, {"ETag": 'W/"v1"'}, {"Last-Modified": DATE, "Content-Encoding": "gzip"}],
                         ids=["no-validator", "weak-etag", "gzip-with-last-modified"])
def test_without_a_strong_validator_nothing_is_kept_and_no_range_is_sent(files, downloader, scratch,
                                                                          headers) -> None:
    body = gzip.compress(os.urandom(SIZE)) if headers.get("Content-Encoding") else BODY
    files.add_sequence("/big", [Route(body=body, headers=headers, cut_after=int(len(body) * 0.6)),
                                 Route(body=body, headers=headers, ranges="honour")])
    job = make_job(files.url("/big"))
    assert broken_attempt(downloader, job) is None
    assert os.listdir(scratch) == []
    fetched = retry(downloader, job)
    assert "Range" not in files.requests_for("/big")[1].headers and "If-Range" not in \
        files.requests_for("/big")[1].headers
    assert (fetched.attempt.resumed_bytes, stored(fetched)) == (0, body)


def test_a_job_with_its_own_range_header_keeps_nothing(files, downloader, scratch) -> None:
    files.add_sequence("/big", cut_then(Route(body=BODY, headers={"ETag": ETAG})))
    job = make_job(files.url("/big"), request_headers={"Range": "bytes=0-"})
    assert broken_attempt(downloader, job) is None and os.listdir(scratch) == []


def test_too_few_bytes_are_not_kept(files, downloader, scratch) -> None:
    files.add_sequence("/big", [Route(body=BODY, headers={"ETag": ETAG}, cut_after=MIB - 1)])
    assert broken_attempt(downloader, make_job(files.url("/big"))) is None and os.listdir(scratch) == []


def test_a_failure_status_on_the_retry_keeps_the_partial_file_for_the_next(files, downloader) -> None:
    files.add_sequence("/big", cut_then(Route(status=503, body=b"busy")))
    job = make_job(files.url("/big"))
    kept = broken_attempt(downloader, job)
    with pytest.raises(HTTPStatusError) as info:
        retry(downloader, job)
    assert info.value.attempt.kept == kept and os.path.getsize(kept.path) == kept.size


def kept_prefix(scratch: str, job: Job, data: bytes) -> None:
    """A partial file of ``data`` recorded on ``job``, as a broken attempt leaves it."""
    path = os.path.join(scratch, f"{job.id}.kept")
    with open(path, "wb") as file:
        file.write(data)
    job.status = dataclasses.replace(job.status, **resume.Partial(path, len(data), ETAG).fields())


def test_max_download_bytes_counts_the_kept_prefix(files, make_engine_downloader, scratch) -> None:
    downloader = make_engine_downloader(max_bytes=SIZE - 1)
    files.add("/big", BODY, headers={"ETag": ETAG}, ranges="honour")
    job = make_job(files.url("/big"))
    kept_prefix(scratch, job, BODY[:CUT])
    with pytest.raises(TooLarge) as info:
        retry(downloader, job)
    assert str(info.value) == (f"Content-Length {SIZE - CUT} (after {CUT} bytes kept) exceeds the limit of "
                               f"{SIZE - 1} bytes")


def test_the_mime_check_reads_the_kept_prefix(files, downloader, scratch) -> None:
    png = image_bytes("PNG", 40, 30)
    body = png + b"\0" * (SIZE - len(png))
    files.add("/img", body, headers={"ETag": ETAG}, ranges="honour")
    job = make_job(files.url("/img"), mime_type="image/png")
    kept_prefix(scratch, job, body[:CUT])
    fetched = retry(downloader, job)
    assert (fetched.mime, fetched.attempt.resumed_bytes, stored(fetched)) == ("image/png", CUT, body)

    other = make_job(files.url("/img"), mime_type="text/*")
    kept_prefix(scratch, other, body[:CUT])
    with pytest.raises(MimeMismatch):
        retry(downloader, other)
    assert files.count("/img") == 2


@pytest.fixture
def make_engine_downloader(scratch, engine):
    made: list[Downloader] = []

    def make(**options) -> Downloader:
        made.append(Downloader(proxy="", default_headers={}, scratch_dir=scratch, chunk_size=64 * 1024,
                               engine=engine, resume_min_bytes=MIB, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


# --------------------------------------------------------------------------- the service, end to end


def test_a_4_mib_body_dropped_at_60_percent_is_resumed_by_the_retry(run_service, files, receiver,
                                                                    tmp_path) -> None:
    files.add_sequence("/big", cut_then(Route(body=BODY, headers={"ETag": ETAG}, ranges="honour")))
    running = run_service()
    job_id = running.enqueue(url=files.url("/big"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                             max_retries=2)
    record = wait_until(lambda: (r := running.get(f"/jobs/{job_id}").json())["callback_state"] == "delivered"
                        and r, timeout=30)
    [body] = receiver.bodies()
    asked = files.requests_for("/big")
    n = body["resumed_bytes"]
    assert MIB <= n <= CUT
    assert (asked[1].headers["Range"], asked[1].headers["If-Range"]) == (f"bytes={n}-", ETAG)
    assert (body["success"], body["attempts"], body["size"], body["reused"]) == (True, 2, SIZE, False)
    assert body["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert (tmp_path / "files" / job_id[:3] / job_id).read_bytes() == BODY
    assert files.body_bytes["/big"] < 1.7 * SIZE
    assert (record["resumed_bytes"], record["partial_path"], record["partial_bytes"]) == (n, "", 0)
    assert list((tmp_path / "tmp").iterdir()) == []  # the partial file became the stored one

    assert wait_until(lambda: metric(running, 'gdl_bytes_saved_total{reason="resumed"}') == n, timeout=10)


def metric(running, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in ``/metrics``."""
    for line in running.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_job_that_fails_for_good_leaves_no_partial_file(run_service, files, receiver, tmp_path) -> None:
    files.add_sequence("/big", cut_then(Route(status=404, body=b"gone")))
    running = run_service()
    job_id = running.enqueue(url=files.url("/big"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                             max_retries=2)
    record = wait_until(lambda: (r := running.get(f"/jobs/{job_id}").json())["callback_state"] == "delivered"
                        and r, timeout=30)
    assert (record["state"], record["attempts"], record["partial_path"]) == ("failed", 2, "")
    assert "Range" in files.requests_for("/big")[1].headers
    assert list((tmp_path / "tmp").iterdir()) == []


def test_partial_files_left_unused_for_partial_ttl_are_removed(tmp_path) -> None:
    now = 1_800_000_000.0
    old, recent = tmp_path / "a.old", tmp_path / "b.recent"
    for path, age in ((old, 3601), (recent, 3599)):
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
    (tmp_path / "sub").mkdir()
    sweeper = resume.StalePartials(str(tmp_path), ttl=3600, clock=lambda: now)
    assert sweeper.remove_once() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.recent", "sub"]
