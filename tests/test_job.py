"""Jobs: every row of the contract's POST /download field table, valid and
invalid, the Redis hash round trip and job ids. Unit tests: no Redis."""

import re
from collections import Counter
from urllib.parse import urlsplit

import pytest

from gdl.errors import ValidationError
from gdl.job import ID_LENGTH, Job, Status, is_valid_id, new_id, new_ids, status_fields
from gdl.mime import check_mime_patterns
from gdl.submission import check_http_url, parse_request

JOB_ID = "AbCdEfGhIjKlMn"
NOW = 1_700_000_000_123

BASE = {
    "url": "http://example.com/a.png",
    "aggr_id": "aggr1",
    "aggr_limit": 2,
    "callback_type": "http",
    "callback_dst": "http://cb.example.com/done",
}


def parse(**changes: object) -> Job:
    """BASE with ``changes`` applied; a value of ``...`` removes the field."""
    body = {k: v for k, v in {**BASE, **changes}.items() if v is not ...}
    return parse_request(body, job_id=JOB_ID, now_ms=NOW)


def refused_field(**changes: object) -> str:
    with pytest.raises(ValidationError) as info:
        parse(**changes)
    assert str(info.value).startswith(info.value.field + ": "), str(info.value)
    return info.value.field


# One value of every JSON type but the right one, per field kind.
NOT_STRINGS = [5, 1.5, True, {"a": "b"}, ["a"]]
NOT_INTEGERS = ["2", True, False, 1.5, {"n": 2}, [2], float("inf"), float("nan")]
NOT_BOOLS = ["true", 1, 0, {}, [], 1.5]
NOT_OBJECTS = ["X-A: b", 5, True, ["X-A", "b"], 1.5]

INVALID = (
    # field removed or null when required
    [({name: ...}, name) for name in ("url", "aggr_id", "aggr_limit")]
    + [({name: None}, name) for name in ("url", "aggr_id", "aggr_limit")]
    # wrong JSON types
    + [({name: v}, name) for name in ("url", "aggr_id", "aggr_proxy", "callback_type", "callback_dst",
                                      "callback_url", "extra", "mime_type", "s3_bucket", "s3_region")
       for v in NOT_STRINGS]
    + [({name: v}, name) for name in ("aggr_limit", "max_retries", "download_timeout") for v in NOT_INTEGERS]
    + [({"extract_image_size": v}, "extract_image_size") for v in NOT_BOOLS]
    + [({"request_headers": v}, "request_headers") for v in NOT_OBJECTS]
    + [
        # empty or blank required strings
        ({"url": ""}, "url"),
        ({"aggr_id": ""}, "aggr_id"),
        ({"aggr_id": "   "}, "aggr_id"),
        ({"aggr_id": "two words"}, "aggr_id"),
        ({"aggr_id": "line\nbreak"}, "aggr_id"),
        ({"aggr_id": "x" * 201}, "aggr_id"),
        # integer bounds
        ({"aggr_limit": 0}, "aggr_limit"),
        ({"aggr_limit": -1}, "aggr_limit"),
        ({"aggr_limit": 10_001}, "aggr_limit"),
        ({"aggr_limit": 10**40}, "aggr_limit"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 101}, "max_retries"),
        ({"download_timeout": 0}, "download_timeout"),
        ({"download_timeout": -30}, "download_timeout"),
        # bad URLs
        ({"url": "ftp://example.com/a.png"}, "url"),
        ({"url": "file:///etc/passwd"}, "url"),
        ({"url": "http://"}, "url"),
        ({"url": "http:///a.png"}, "url"),
        ({"url": "http://exa mple.com/a.png"}, "url"),
        ({"url": "http://example.com/a b.png"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "example.com/a.png"}, "url"),
        ({"url": "http://example.com:99999/"}, "url"),
        ({"url": "http://example.com/\x00"}, "url"),
        ({"url": "http://example.com/a\tb.png"}, "url"),
        ({"url": "http://example.com/a\u00a0b.png"}, "url"),  # no-break space
        ({"url": "http://example.com/a\u3000b.png"}, "url"),  # ideographic space
        ({"url": "http://example.com/a\u200bb.png"}, "url"),  # zero-width space (a format character)
        ({"url": "http://example.com/" + "a" * 8200}, "url"),
        ({"aggr_proxy": "ftp://proxy:21"}, "aggr_proxy"),
        ({"aggr_proxy": "not a proxy"}, "aggr_proxy"),
        ({"aggr_proxy": "http://"}, "aggr_proxy"),
        # callbacks
        ({"callback_dst": ...}, "callback_dst"),
        ({"callback_dst": ""}, "callback_dst"),
        ({"callback_type": ...}, "callback_type"),
        ({"callback_type": ""}, "callback_type"),
        ({"callback_type": ..., "callback_dst": ...}, "callback_type"),
        ({"callback_type": "smtp"}, "callback_type"),
        ({"callback_type": "HTTP"}, "callback_type"),
        ({"callback_dst": "ftp://cb.example.com/"}, "callback_dst"),
        ({"callback_dst": "cb.example.com"}, "callback_dst"),
        ({"callback_type": "kafka", "callback_dst": "bad topic"}, "callback_dst"),
        ({"callback_type": "kafka", "callback_dst": "t" * 250}, "callback_dst"),
        ({"callback_type": ..., "callback_dst": ..., "callback_url": "ftp://cb/"}, "callback_url"),
        ({"callback_type": ..., "callback_dst": ..., "callback_url": "no host"}, "callback_url"),
        # s3: both or neither
        ({"s3_bucket": "my-bucket"}, "s3_region"),
        ({"s3_region": "eu-west-1"}, "s3_bucket"),
        ({"s3_bucket": "My_Bucket", "s3_region": "eu-west-1"}, "s3_bucket"),
        ({"s3_bucket": "my-bucket", "s3_region": "Europe West"}, "s3_region"),
        # mime patterns
        ({"mime_type": "image"}, "mime_type"),
        ({"mime_type": ","}, "mime_type"),
        ({"mime_type": "image/png,,"}, "mime_type"),
        ({"mime_type": "image/png,"}, "mime_type"),
        ({"mime_type": "!"}, "mime_type"),
        ({"mime_type": "!image"}, "mime_type"),
        ({"mime_type": "image/"}, "mime_type"),
        ({"mime_type": "/png"}, "mime_type"),
        ({"mime_type": "image/png;q=1"}, "mime_type"),
        ({"mime_type": "image/ png"}, "mime_type"),
        # extra
        ({"extra": "x" * (64 * 1024 + 1)}, "extra"),
        # request headers
        ({"request_headers": {"X-Num": 5}}, "request_headers"),
        ({"request_headers": {"X-Null": None}}, "request_headers"),
        ({"request_headers": {"X-Bool": True}}, "request_headers"),
        ({"request_headers": {"X-List": ["a"]}}, "request_headers"),
        ({"request_headers": {"X-Obj": {"a": "b"}}}, "request_headers"),
        ({"request_headers": {"X-A": "a\r\nInjected: yes"}}, "request_headers"),
        ({"request_headers": {"X-A": "a\nb"}}, "request_headers"),
        ({"request_headers": {"X-A": "a\rb"}}, "request_headers"),
        ({"request_headers": {"X-A": "a\x00b"}}, "request_headers"),
        ({"request_headers": {"Bad Name": "v"}}, "request_headers"),
        ({"request_headers": {"": "v"}}, "request_headers"),
        ({"request_headers": {"X:Y": "v"}}, "request_headers"),
        ({"request_headers": {"X-\u00e9": "v"}}, "request_headers"),
        ({"request_headers": {"Host": "evil.example"}}, "request_headers"),
        ({"request_headers": {"host": "evil.example"}}, "request_headers"),
        ({"request_headers": {"Connection": "close"}}, "request_headers"),
        ({"request_headers": {"Transfer-Encoding": "chunked"}}, "request_headers"),
        ({"request_headers": {"Content-Length": "10"}}, "request_headers"),
        ({"request_headers": {f"X-H{i}": "v" for i in range(65)}}, "request_headers"),
    ]
)


@pytest.mark.parametrize(("changes", "field"), INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_field(changes: dict, field: str) -> None:
    assert refused_field(**changes) == field


@pytest.mark.parametrize("body", [None, [], [BASE], "a string", 5, True])
def test_body_not_an_object(body: object) -> None:
    with pytest.raises(ValidationError) as info:
        parse_request(body, job_id=JOB_ID, now_ms=NOW)
    assert info.value.field == "body"


def test_minimal_job() -> None:
    job = parse()
    assert job == Job(id=JOB_ID, url=BASE["url"], aggr_id="aggr1", aggr_limit=2, callback_type="http",
                      callback_dst="http://cb.example.com/done", created_at=NOW)
    assert job.max_retries is None and job.download_timeout is None
    assert job.status == Status(state="queued")
    assert job.wants_callback is True


def test_every_field() -> None:
    job = parse(
        url="https://example.com:8443/img/a.png?x=1&y=%20",
        aggr_id="shop-42.images",
        aggr_limit=10_000,
        aggr_proxy="socks5h://proxy.example:1080",
        extra='{"opaque": "to gdl"}',
        mime_type="!image/vnd.adobe.photoshop,image/*",
        max_retries=0,
        extract_image_size=True,
        download_timeout=1,
        request_headers={"User-Agent": "shop-bot/1.0", "X-Trace": "a\tb", "Accept": "image/*"},
        s3_bucket="my-bucket.eu",
        s3_region="eu-west-1",
    )
    assert job.url == "https://example.com:8443/img/a.png?x=1&y=%20"
    assert (job.aggr_id, job.aggr_limit, job.aggr_proxy) == ("shop-42.images", 10_000, "socks5h://proxy.example:1080")
    assert job.extra == '{"opaque": "to gdl"}'
    assert job.mime_type == "!image/vnd.adobe.photoshop,image/*"
    assert (job.max_retries, job.extract_image_size, job.download_timeout) == (0, True, 1)
    assert job.request_headers == {"User-Agent": "shop-bot/1.0", "X-Trace": "a\tb", "Accept": "image/*"}
    assert (job.s3_bucket, job.s3_region) == ("my-bucket.eu", "eu-west-1")
    assert (job.callback_type, job.callback_dst) == ("http", "http://cb.example.com/done")


def test_legacy_callback_url() -> None:
    job = parse(callback_type=..., callback_dst=..., callback_url="http://legacy.example/cb?x=1")
    assert (job.callback_type, job.callback_dst) == ("http", "http://legacy.example/cb?x=1")


def test_callback_type_wins_over_legacy_url() -> None:
    job = parse(callback_url="http://legacy.example/cb")
    assert (job.callback_type, job.callback_dst) == ("http", "http://cb.example.com/done")


def test_kafka_topic() -> None:
    job = parse(callback_type="kafka", callback_dst="downloads.done-v1_2")
    assert (job.callback_type, job.callback_dst) == ("kafka", "downloads.done-v1_2")


def test_s3_bucket_without_callback() -> None:
    job = parse(callback_type=..., callback_dst=..., s3_bucket="my-bucket", s3_region="us-east-1")
    assert (job.callback_type, job.callback_dst) == ("", "")
    assert job.wants_callback is False


@pytest.mark.parametrize("name", ["aggr_proxy", "callback_url", "extra", "mime_type", "max_retries",
                                  "extract_image_size", "download_timeout", "request_headers",
                                  "s3_bucket", "s3_region"])
def test_null_optional_field_is_refused_naming_it(name: str) -> None:
    # The contract (and the Go service): a field is either absent or of its type.
    with pytest.raises(ValidationError) as info:
        parse(**{name: None})
    assert info.value.field == name
    assert str(info.value).startswith(f"{name}: must be ") and "not null" in str(info.value)


def test_unknown_fields_are_ignored() -> None:
    job = parse(priority=5, tags=["a"], nested={"x": None}, id="ZZZZZZZZZZZZZZ", created_at=1)
    assert job == parse()
    assert (job.id, job.created_at) == (JOB_ID, NOW)


def test_integral_float_is_an_integer() -> None:
    assert parse(aggr_limit=3.0).aggr_limit == 3
    assert isinstance(parse(aggr_limit=3.0).aggr_limit, int)


@pytest.mark.parametrize(("value", "expected"), [
    ("!image/vnd.adobe.photoshop,image/*", [(True, "image/vnd.adobe.photoshop"), (False, "image/*")]),
    ("image/png", [(False, "image/png")]),
    ("image/png, image/JPEG", [(False, "image/png"), (False, "image/jpeg")]),
    ("*/*", [(False, "*/*")]),
    ("application/vnd.ms-excel,text/x-c++", [(False, "application/vnd.ms-excel"), (False, "text/x-c++")]),
    ("image/[pj]ng", [(False, "image/[pj]ng")]),
])
def test_good_mime_patterns(value: str, expected: list) -> None:
    assert check_mime_patterns(value) == expected
    assert parse(mime_type=value).mime_type == value


# --------------------------------------------------------------------------- Redis hash

def full_job() -> Job:
    return Job(
        id=JOB_ID, url="http://example.com/a.png?q=1", aggr_id="aggr:with:colons", aggr_limit=7,
        aggr_proxy="http://proxy:3128", callback_type="kafka", callback_dst="topic", extra="x,y\nz",
        mime_type="image/*", max_retries=3, extract_image_size=True, download_timeout=60,
        request_headers={"X-A": "1", "X-\u00fc": "\u00e9"}, s3_bucket="b-1", s3_region="eu-west-1",
        created_at=NOW,
        status=Status(state="failed", attempts=3, error="Received status code 503", response_code=503,
                      bytes=12345, image_size="10x20", mime="image/png", finished_at=NOW + 5,
                      callback_state="delivered", callback_attempts=1, callback_error="",
                      callback_code=200, delivered_at=NOW + 9),
    )


def test_hash_round_trip_every_field() -> None:
    job = full_job()
    data = job.to_hash()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in data.items())
    assert data["extract_image_size"] == "1"
    assert data["max_retries"] == "3"
    assert "status" not in data
    assert data["state"] == "failed" and data["response_code"] == "503"
    assert Job.from_hash(data) == job


def test_hash_round_trip_defaults_and_none() -> None:
    job = Job(id=JOB_ID, url="https://e.com/", aggr_id="a", aggr_limit=1, created_at=NOW)
    data = job.to_hash()
    assert data == {"id": JOB_ID, "url": "https://e.com/", "aggr_id": "a", "aggr_limit": "1",
                    "created_at": str(NOW), "state": "queued"}  # defaults are left out, state excepted
    back = Job.from_hash(data)
    assert back == job
    assert back.max_retries is None and back.download_timeout is None
    assert back.extract_image_size is False and back.request_headers == {}


def test_hash_round_trip_zero_retries_is_not_none() -> None:
    job = parse(max_retries=0)
    assert Job.from_hash(job.to_hash()).max_retries == 0


def test_from_hash_ignores_fields_it_does_not_know() -> None:
    data = {**full_job().to_hash(), "owner": "host:123:abc", "future_field": "x"}
    assert Job.from_hash(data) == full_job()


def test_public_view_flattens_status() -> None:
    view = full_job().public()
    assert view["state"] == "failed" and view["callback_state"] == "delivered"
    assert view["request_headers"] == {"X-A": "1", "X-\u00fc": "\u00e9"}
    assert "status" not in view


def test_status_fields_refuse_unknown_names() -> None:
    assert status_fields(state="queued", attempts=2) == {"state": "queued", "attempts": "2"}
    with pytest.raises(KeyError):
        status_fields(stat="queued")


# --------------------------------------------------------------------------- URLs checked by their origin

def _problem_of_whole_url(value: str) -> str | None:
    """The check as made before it read only the origin: urlsplit of the whole URL."""
    if not value.isprintable() or " " in value:
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    return None if parts.hostname else "must have a host"


TRICKY_URLS = [
    "http://example.com/a.png", "HTTPS://Example.COM:8443/a?b=c#d", "http://example.com", "http://example.com?q",
    "http://example.com#f", "http://user:pw@example.com:80/x", "http://[::1]:8080/x", "http://[::1/x", "http://::1]/x",
    "http://[v1.fe]/x", "http://[zz]/x", "http://example.com:99999/x", "http://example.com:abc/x", "http://:80/x",
    "http:/example.com/x", "http:example.com/x", "http:", "http://", "//example.com/x", "example.com/x:80",
    "ftp://example.com/x", "a_b://example.com/x", "ht#tp://example.com", "ht?tp://example.com",
    "abc//host:80/x", "http://exa\u2100mple.com/x", "http://example.com/\u2100/x:1", "http://\u00e9t\u00e9.fr/x",
    "http://example.com/x y", "http://example.com/\tx", "http://exa mple.com", "http:///x", "http://?x", "http://#x",
    "http://example.com:80:80/x", "javascript:alert(1)//http://example.com", "http://a/b//c:d@e",
]


@pytest.mark.parametrize("url", TRICKY_URLS)
def test_a_url_is_judged_by_its_origin_as_urlsplit_judges_it_whole(url: str) -> None:
    expected = _problem_of_whole_url(url)
    if expected is None:
        check_http_url("url", url)
    else:
        with pytest.raises(ValidationError) as err:
            check_http_url("url", url)
        assert str(err.value) == f"url: {expected}"


# --------------------------------------------------------------------------- ids

def test_new_id_format() -> None:
    for _ in range(100):
        job_id = new_id()
        assert len(job_id) == ID_LENGTH == 14
        assert re.fullmatch(r"[A-Za-z0-9]{14}", job_id), job_id
        assert is_valid_id(job_id)


def test_new_id_unique_and_spread() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000
    chars = set("".join(ids))
    assert len(chars) == 62  # every letter and digit shows up in 140k draws


def test_new_ids_draws_a_batch_of_unique_spread_ids() -> None:
    ids = new_ids(10_000)
    assert len(ids) == len(set(ids)) == 10_000
    assert all(is_valid_id(job_id) for job_id in ids)
    assert len(set("".join(ids))) == 62
    # Every position is spread too: the last character uses the top of each draw.
    assert len({job_id[-1] for job_id in ids}) == 62 and len({job_id[0] for job_id in ids}) == 62


def test_new_ids_favour_no_character() -> None:
    # A byte modulo 62 without dropping the bytes 248 to 255 would make the first 8 letters
    # 5/4 as likely as the rest; 1.4 million characters tell that apart by far (each count
    # is about 22,600, give or take 150).
    counts = Counter("".join(new_ids(100_000)))
    mean = sum(counts.values()) / 62
    assert len(counts) == 62
    assert all(abs(n - mean) < 0.05 * mean for n in counts.values()), sorted(counts.items())


@pytest.mark.parametrize("value", ["", "a" * 13, "a" * 15, "a" * 13 + "-", "a" * 13 + "/", "a" * 14 + "\n",
                                   "../../etc/pas", "a" * 13 + "\u00e9"])
def test_invalid_ids(value: str) -> None:
    assert is_valid_id(value) is False
