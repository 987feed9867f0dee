"""Verifiable results (issue 18): what every callback says about the bytes
stored, the job's expected ``checksum``, and Standard Webhooks signatures.

Unit tests first (no Redis), then the service in this process against
real Redis and loopback servers, then gdl as a real subprocess where the
process's own output is the subject.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import requests
import yaml
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gdl import checksum, signing
from gdl.errors import ChecksumMismatch, ConfigError, ValidationError
from gdl.job import rfc3339
from gdl.submission import parse_request
from tests.conftest import make_config, wait_until
from tests.test_resilience import FakeSentry, api_base, serve_cfg, wait_for_api

SECRET_A = "whsec_" + base64.b64encode(bytes(range(32))).decode()
SECRET_B = "whsec_" + base64.b64encode(bytes(range(100, 124))).decode()
DATA = bytes(range(256)) * 300  # 76800 bytes: more than one 64 KiB chunk
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def digest(name: str, data: bytes) -> str:
    return hashlib.new(name, data).hexdigest()


def callback_done(running, job_id: str) -> dict:
    def done():
        record = running.get(f"/jobs/{job_id}").json()
        return record if record["callback_state"] in ("delivered", "failed") else None
    return wait_until(done, timeout=20)


def check_timings(body: dict) -> None:
    timings = body["timings"]
    assert set(timings) == {"wait_ms", "ttfb_ms", "download_ms", "total_ms"}
    assert all(type(v) is int and v >= 0 for v in timings.values()), timings
    assert timings["total_ms"] >= timings["wait_ms"] + timings["ttfb_ms"] + timings["download_ms"]
    started = datetime.fromisoformat(body["started_at"])
    finished = datetime.fromisoformat(body["finished_at"])
    assert RFC3339_UTC.match(body["started_at"]) and RFC3339_UTC.match(body["finished_at"])
    assert started <= finished


# --------------------------------------------------------------------------- checksum field, unit


@pytest.mark.parametrize(("value", "algorithm", "hexdigest"), [
    (f"sha-256={digest('sha256', b'x')}", "sha-256", digest("sha256", b"x")),
    (f"sha256={digest('sha256', b'x').upper()}", "sha-256", digest("sha256", b"x")),
    (f"SHA-512={digest('sha512', b'x')}", "sha-512", digest("sha512", b"x")),
    (f"sha-1={digest('sha1', b'x')}", "sha-1", digest("sha1", b"x")),
    (f"md5={digest('md5', b'x').upper()}", "md5", digest("md5", b"x")),
])
def test_checksum_values_parse_to_algorithm_and_lowercase_hex(value, algorithm, hexdigest) -> None:
    assert checksum.parse(value) == checksum.Expected(algorithm, hexdigest)


@pytest.mark.parametrize("value", [
    "", "sha-256", "sha-256=", f"sha-384={digest('sha384', b'x')}", f"sha-256={digest('sha1', b'x')}",
    "md5=" + "g" * 32, f"sha-256= {digest('sha256', b'x')}", f"crc32={digest('md5', b'x')}",
])
def test_malformed_checksums_are_refused_naming_the_field(value) -> None:
    with pytest.raises(ValidationError) as info:
        checksum.parse(value)
    assert info.value.field == "checksum"


@pytest.mark.parametrize("bad", ["", None, 5, "sha-256=abc", ["sha-256=x"]])
def test_a_request_with_a_bad_checksum_names_the_field(bad) -> None:
    body = {"url": "http://e.com/a", "aggr_id": "a", "aggr_limit": 1, "callback_url": "http://e.com/cb",
            "checksum": bad}
    with pytest.raises(ValidationError) as info:
        parse_request(body, job_id="A" * 14, now_ms=1)
    assert info.value.field == "checksum"


def test_digests_check_the_expected_algorithm_and_name_both_sides_on_a_mismatch() -> None:
    good = checksum.Digests(f"md5={digest('md5', b'ab')}")
    good.update(b"a")
    good.update(b"b")
    assert good.check() == digest("sha256", b"ab")  # the sha-256 is always the reported one
    bad = checksum.Digests(f"sha-1={digest('sha1', b'other')}")
    bad.update(b"ab")
    with pytest.raises(ChecksumMismatch) as info:
        bad.check(200)
    assert str(info.value) == (f"checksum mismatch: expected sha-1={digest('sha1', b'other')}, "
                               f"got sha-1={digest('sha1', b'ab')}")
    assert (info.value.retriable, info.value.phase, info.value.response_code) == (True, "body", 200)


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert (rfc3339(0), rfc3339(1_765_000_000_123)) == ("", "2025-12-06T05:46:40.123Z")


# --------------------------------------------------------------------------- signing, unit


def independent_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_signer_headers_match_an_independent_hmac_one_entry_per_secret() -> None:
    body = b'{"job_id":"6QEywYsd0jrKAg"}'
    signer = signing.Signer.from_secrets([SECRET_A, SECRET_B])
    headers = dict(signer.headers("6QEywYsd0jrKAg", body, now_ms=1_765_000_000_999))
    assert headers["webhook-id"] == "msg_6QEywYsd0jrKAg"
    assert headers["webhook-timestamp"] == "1765000000"
    assert headers["webhook-signature"] == " ".join(
        independent_signature(s, "msg_6QEywYsd0jrKAg", "1765000000", body) for s in (SECRET_A, SECRET_B))
    assert signing.Signer([]).headers("6QEywYsd0jrKAg", body, now_ms=1) == []
    assert SECRET_A not in repr(signer) and "Signer(2 key(s))" == repr(signer)


@pytest.mark.parametrize("secret", [
    "whsec_" + base64.b64encode(b"x" * 23).decode(),  # too short
    "whsec_" + base64.b64encode(b"x" * 65).decode(),  # too long
    base64.b64encode(b"x" * 32).decode(),  # no prefix
    "whsec_" + base64.b64encode(b"x" * 32).decode().rstrip("="),  # not strict: padding missing
    "whsec_" + base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # not the standard alphabet
    "whsec_" + base64.b64encode(b"x" * 32).decode() + "\n",
])
def test_malformed_secrets_name_the_key_and_never_the_secret(secret) -> None:
    with pytest.raises(ConfigError) as info:
        signing.parse_secrets([SECRET_A, secret])
    assert str(info.value).startswith("notifier.signing_secrets[1]: ")
    assert secret.strip() not in str(info.value) and secret[6:].strip() not in str(info.value)


def test_secrets_from_the_environment_and_a_secret_of_the_wrong_shape(tmp_path, redis_server) -> None:
    from gdl import config

    path = tmp_path / "gdl.yaml"
    path.write_text("{}\n")
    cfg = config.load(path, environ={"GDL_NOTIFIER_SIGNING_SECRETS": f"{SECRET_A},{SECRET_B}"})
    assert cfg.notifier.signing_secrets == [SECRET_A, SECRET_B]
    path.write_text(yaml.safe_dump({"notifier": {"signing_secrets": {"key": SECRET_A}}}))
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert str(info.value) == "notifier.signing_secrets: must be a list (got dict)"


def test_secret_bounds_and_new_secrets() -> None:
    for size in (24, 64):
        assert len(signing.decode_secret("whsec_" + base64.b64encode(b"k" * size).decode(), "k")) == size
    fresh = signing.new_secret()
    assert fresh.startswith("whsec_") and len(signing.decode_secret(fresh, "k")) == 32
    assert fresh != signing.new_secret()


def test_a_secret_stays_out_of_the_config_repr(tmp_path, redis_server) -> None:
    cfg = make_config(tmp_path, redis_server.url, notifier={"signing_secrets": [SECRET_A]})
    assert cfg.notifier.signing_secrets == [SECRET_A]
    assert SECRET_A[6:20] not in repr(cfg)


# --------------------------------------------------------------------------- results in callbacks


def test_callback_and_job_report_the_stored_bytes(run_service, files, receiver, tmp_path) -> None:
    files.add("/a.bin", DATA, headers={"Content-Type": "application/x-test", "ETag": '"v1"',
                                      "Last-Modified": "Sat, 05 Dec 2026 10:00:00 GMT"})
    running = run_service()
    job_id = running.enqueue(url=files.url("/a.bin"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = callback_done(running, job_id)
    [body] = receiver.bodies()
    stored = (tmp_path / "files" / job_id[:3] / job_id).read_bytes()
    assert stored == DATA
    assert (body["sha256"], body["size"]) == (digest("sha256", stored), len(stored))
    assert (body["content_type"], body["etag"], body["last_modified"]) == \
        ("application/x-test", '"v1"', "Sat, 05 Dec 2026 10:00:00 GMT")
    assert (body["final_url"], body["redirects"], body["attempts"]) == (files.url("/a.bin"), 0, 1)
    assert (body["resumed_bytes"], body["reused"]) == (0, False)
    check_timings(body)
    # GET /jobs/<id> says the same.
    assert {name: record[name] for name in ("sha256", "size", "final_url", "started_at", "finished_at",
                                            "timings")} == \
        {name: body[name] for name in ("sha256", "size", "final_url", "started_at", "finished_at", "timings")}


def test_the_job_hash_keeps_only_what_differs_from_the_defaults(run_service, files, receiver, store) -> None:
    from gdl.store import job_key

    files.add("/a", b"plain")
    running = run_service()
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    callback_done(running, job_id)
    results = set(store.redis.hgetall(job_key(job_id))) & {
        "sha256", "content_type", "final_url", "redirects", "etag", "last_modified", "resumed_bytes", "reused",
        "started_at", "wait_ms", "ttfb_ms", "download_ms", "total_ms"}
    # No redirect, no ETag or Last-Modified, no Content-Type: those are left out; the times of a
    # loopback download may round to 0 ms, the digest and the start never do.
    assert {"sha256", "started_at"} <= results <= {"sha256", "started_at", "wait_ms", "ttfb_ms", "download_ms",
                                                   "total_ms"}
    [body] = receiver.bodies()
    assert (body["final_url"], body["redirects"], body["etag"]) == (files.url("/a"), 0, "")


def test_a_gzip_response_is_digested_as_served(run_service, files, receiver, tmp_path) -> None:
    served = gzip.compress(b"hello " * 1000)
    files.add("/page", served, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
    running = run_service()
    job_id = running.enqueue(url=files.url("/page"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    callback_done(running, job_id)
    [body] = receiver.bodies()
    assert (body["sha256"], body["size"]) == (digest("sha256", served), len(served))
    assert (tmp_path / "files" / job_id[:3] / job_id).read_bytes() == served


def test_two_redirects_give_the_last_hop_and_a_count_of_two(run_service, files, receiver) -> None:
    files.add_redirect("/first", "/second")
    files.add_redirect("/second", "/final", status=301)
    files.add("/final", b"arrived")
    running = run_service()
    job_id = running.enqueue(url=files.url("/first"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    callback_done(running, job_id)
    [body] = receiver.bodies()
    assert (body["final_url"], body["redirects"], body["sha256"], body["size"]) == \
        (files.url("/final"), 2, digest("sha256", b"arrived"), 7)
    check_timings(body)


def test_a_404_reports_the_final_attempt_as_far_as_it_got(run_service, files, receiver) -> None:
    files.add("/gone", b"not here", status=404, headers={"Content-Type": "text/html"})
    running = run_service()
    job_id = running.enqueue(url=files.url("/gone"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    record = callback_done(running, job_id)
    [body] = receiver.bodies()
    assert (body["success"], body["sha256"], body["size"], body["content_type"]) == (False, "", 0, "text/html")
    assert (body["final_url"], body["redirects"], body["attempts"], body["etag"]) == (files.url("/gone"), 0, 1, "")
    check_timings(body)
    assert (record["sha256"], record["attempts"], record["content_type"]) == ("", 1, "text/html")


# --------------------------------------------------------------------------- checksum, end to end


@pytest.mark.parametrize("alg", ["sha-256", "sha256", "sha-512", "sha-1", "md5"])
def test_a_matching_checksum_stores(run_service, files, receiver, tmp_path, alg) -> None:
    files.add("/a", DATA)
    running = run_service()
    expected = f"{alg}={digest(checksum.ALGORITHMS[checksum.ALIASES.get(alg, alg)], DATA).upper()}"
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                             checksum=expected)
    record = callback_done(running, job_id)
    assert (record["state"], record["attempts"], record["checksum"]) == ("succeeded", 1, expected)
    assert (tmp_path / "files" / job_id[:3] / job_id).read_bytes() == DATA


def test_a_mismatching_checksum_is_retried_then_fails_storing_nothing(run_service, files, receiver,
                                                                      tmp_path) -> None:
    files.add("/a", DATA)
    running = run_service()
    wanted = digest("sha512", b"something else")
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"),
                             checksum=f"sha-512={wanted}", max_retries=2)
    record = callback_done(running, job_id)
    error = f"checksum mismatch: expected sha-512={wanted}, got sha-512={digest('sha512', DATA)}"
    assert (record["state"], record["attempts"], record["error"]) == ("failed", 3, error)
    assert files.count("/a") == 3
    assert [e["outcome"] for e in record["attempts_log"] if e["kind"] == "download"] == ["retry", "retry", "failed"]
    assert not (tmp_path / "files" / job_id[:3] / job_id).exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # no temp file left either
    [body] = receiver.bodies()
    assert (body["success"], body["error"], body["sha256"], body["size"]) == (False, error, "", len(DATA))


@pytest.mark.parametrize(("bad", "error"), [
    ("", "checksum: must be <algorithm>=<hex> with algorithm one of sha-256, sha-512, sha-1, md5 (got '')"),
    (None, "checksum: must be a string, not null (leave the field out instead)"),
    ("sha-256=0", "checksum: sha-256 needs 64 hex digits (got 1 characters)"),
    ("blake2=00", "checksum: must be <algorithm>=<hex> with algorithm one of sha-256, sha-512, sha-1, md5 "
                  "(got 'blake2=00')"),
])
def test_a_bad_checksum_is_a_400_naming_it(run_service, bad, error) -> None:
    running = run_service(("api",))
    response = running.post("/download", {"url": "http://e.com/a", "aggr_id": "a", "aggr_limit": 1,
                                          "callback_url": "http://e.com/cb", "checksum": bad})
    assert (response.status_code, response.json()["error"]) == (400, error)


def test_a_batch_item_with_a_bad_checksum_is_refused_alone(run_service) -> None:
    running = run_service(("api",))
    job = {"url": "http://e.com/a", "aggr_id": "a", "aggr_limit": 1, "callback_url": "http://e.com/cb"}
    response = running.post("/download/batch", {"jobs": [
        {**job, "checksum": f"md5={digest('md5', b'x')}"}, {**job, "checksum": "md5=00"}]})
    assert response.status_code == 200
    first, second = response.json()["jobs"]
    assert (first["index"], first["status"]) == (0, 201)
    assert second == {"index": 1, "status": 400, "error": "checksum: md5 needs 32 hex digits (got 2 characters)"}
    assert running.get(f"/jobs/{first['id']}").json()["checksum"] == f"md5={digest('md5', b'x')}"


# --------------------------------------------------------------------------- signed callbacks


def verify_all(receiver, secret: str) -> list[dict]:
    """Every callback received, verified from its raw bytes by the reference library."""
    hook = Webhook(secret)
    return [hook.verify(raw, headers) for raw, headers in zip(receiver.raw["/cb"], receiver.headers["/cb"])]


def test_signed_callbacks_verify_with_standardwebhooks_across_retry_and_redelivery(run_service, files,
                                                                                    receiver) -> None:
    files.add("/a", DATA)
    receiver.answer("/cb", 500, 500)  # the attempt and its one retry fail; POST /retry re-delivers
    # A retry a second or more later: the timestamps of the two attempts must differ.
    running = run_service(notifier={"signing_secrets": [SECRET_A, SECRET_B], "retry_backoff": 1.0,
                                    "max_retries": 1})
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    assert callback_done(running, job_id)["callback_state"] == "failed"
    assert running.post(f"/retry/{job_id}").status_code == 204
    wait_until(lambda: len(receiver.raw["/cb"]) == 3, timeout=20)
    headers = receiver.headers["/cb"]
    assert [h["Webhook-Id"] for h in headers] == [f"msg_{job_id}"] * 3
    assert headers[0]["Webhook-Timestamp"] != headers[1]["Webhook-Timestamp"]
    assert all(len(h["Webhook-Signature"].split(" ")) == 2 for h in headers)
    for secret in (SECRET_A, SECRET_B):  # a receiver holding either secret verifies every attempt
        assert [body["job_id"] for body in verify_all(receiver, secret)] == [job_id] * 3
    for raw, h in zip(receiver.raw["/cb"], headers):
        assert h["Webhook-Signature"].split(" ")[0] == independent_signature(
            SECRET_A, h["Webhook-Id"], h["Webhook-Timestamp"], raw)


def test_tampered_wrong_secret_and_stale_callbacks_are_rejected(run_service, files, receiver) -> None:
    files.add("/gone", b"", status=404)
    running = run_service(notifier={"signing_secrets": [SECRET_A]})
    job_id = running.enqueue(url=files.url("/gone"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    callback_done(running, job_id)
    [body] = verify_all(receiver, SECRET_A)  # a failure callback verifies too
    assert (body["job_id"], body["success"]) == (job_id, False)
    [raw], [headers] = receiver.raw["/cb"], receiver.headers["/cb"]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(raw.replace(b'"success":false', b'"success":true'), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(raw, headers)
    stale_ms = (int(headers["Webhook-Timestamp"]) - 360) * 1000
    stale = dict(signing.Signer.from_secrets([SECRET_A]).headers(job_id, raw, now_ms=stale_ms))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET_A).verify(raw, stale)


def test_without_secrets_no_signature_headers(run_service, files, receiver) -> None:
    files.add("/a", b"x")
    running = run_service()
    job_id = running.enqueue(url=files.url("/a"), aggr_id="a", aggr_limit=1, callback_url=receiver.url("/cb"))
    callback_done(running, job_id)
    [headers] = receiver.headers["/cb"]
    assert not {"Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"} & set(headers)


# --------------------------------------------------------------------------- the process


def run_gdl(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdl.cli", "--config", str(cfg_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=str(cfg_path.parent))


def test_a_malformed_secret_is_exit_2_naming_the_key_not_the_secret(tmp_path) -> None:
    secret = "whsec_" + base64.b64encode(b"short secret material").decode()  # 21 bytes
    path = tmp_path / "gdl.yaml"
    path.write_text(yaml.safe_dump({"notifier": {"signing_secrets": [SECRET_A, secret]}}))
    done = run_gdl(path, "notifier")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "gdl: notifier.signing_secrets[1]: must encode 24 to 64 bytes (has 21)"]
    assert secret[6:] not in done.stderr and "short secret" not in done.stderr


def test_keys_new_prints_a_fresh_secret(tmp_path) -> None:
    path = tmp_path / "gdl.yaml"
    path.write_text("{}\n")
    first, second = run_gdl(path, "keys", "new"), run_gdl(path, "keys", "new")
    assert (first.returncode, first.stderr, second.returncode) == (0, "", 0)
    secret = first.stdout.strip()
    assert len(signing.decode_secret(secret, "k")) == signing.NEW_KEY_BYTES
    assert secret != second.stdout.strip()


def test_the_secret_appears_in_no_log_job_stats_or_sentry_event(tmp_path, redis_server, store, gdl_process,
                                                                 files, receiver) -> None:
    sentry = FakeSentry()
    try:
        files.add("/ok", b"fine")
        cfg = serve_cfg(tmp_path, redis_server.url, sentry={"dsn": sentry.dsn()},
                        notifier={"signing_secrets": [SECRET_A, SECRET_B], "retry_backoff": 0.05})
        process = gdl_process(cfg, "--log-level", "debug")
        wait_for_api(cfg)
        session = requests.Session()

        def submit() -> str:
            body = {"url": files.url("/ok"), "aggr_id": "s", "aggr_limit": 1, "callback_url": receiver.url("/cb")}
            response = session.post(api_base(cfg) + "/download", data=json.dumps(body).encode(), timeout=10)
            assert response.status_code == 201, response.text
            return response.json()["id"]

        signed = submit()
        wait_until(lambda: session.get(f"{api_base(cfg)}/jobs/{signed}").json()["callback_state"] == "delivered",
                   timeout=20)
        storage = Path(cfg.processor.storage_dir)
        storage.rmdir()
        storage.write_text("not a directory")  # our disk breaks: an internal error goes to Sentry
        broken = submit()
        wait_until(lambda: any(e["tags"].get("job_id") == broken for e in sentry.events), timeout=15)
        seen = [process.output(), json.dumps(sentry.events),
                session.get(f"{api_base(cfg)}/jobs/{signed}").text, session.get(f"{api_base(cfg)}/jobs/{broken}").text]
        for component in ("processor", "notifier", "api"):
            seen.append(session.get(f"{api_base(cfg)}/stats/{component}").text)
        text = "\n".join(seen)
        assert "DEBUG" in process.output() and f"job {signed}" in process.output()
        for secret in (SECRET_A, SECRET_B):
            key = base64.b64decode(secret[6:])
            for form in (secret, secret[6:], secret[6:30], key.hex(), repr(key)[2:-1]):
                assert form not in text
        storage.unlink()
        storage.mkdir()
    finally:
        sentry.stop()
