"""Configuration: YAML file plus ``GDL_SECTION_KEY`` environment overrides.

Owns every default (each named once, with a one-line doc in ``help``) and the
validation of every key. The result is a tree of frozen dataclasses; nothing
else in gdl reads the YAML or the environment for settings.

A bad value raises :class:`ConfigError` whose message starts with the dotted
key (``processor.disk.high: ...``), or with the environment variable and the
key when the value came from the environment (``GDL_PROCESSOR_DISK_HIGH
(processor.disk.high): ...``); the CLI prints that one line and exits 2. An
unknown key, or a ``GDL_*`` variable that names no key, is an error that
suggests the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gdl import signing
from gdl.errors import ConfigError

ENV_PREFIX = "GDL_"
# GDL_* variables that are not config keys, and who reads them: they pass the unknown-variable check.
OTHER_VARIABLES = {
    "GDL_LOG_LEVEL": "the default of --log-level (gdl/cli.py)",
    "GDL_LOG_FORMAT": "the default of --log-format (gdl/cli.py)",
    "GDL_SCREENSHOTS": "where tests/test_dashboard.py saves the dashboard's screenshots",
}


def _key(default: Any, help: str, **meta: Any) -> Any:
    """A config key: its default and its one-line documentation."""
    # A secret's value stays out of every repr of the config (logs, Sentry's frame variables).
    shown = not meta.get("secret", False)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), repr=shown, metadata={"help": help, **meta})
    return field(default=default, repr=shown, metadata={"help": help, **meta})


# Redis's appendfsync policies gdl offers for its embedded server ("no" leaves it to the kernel: too loose).
EMBEDDED_FSYNC = ("always", "everysec")


@dataclass(frozen=True)
class RedisConfig:
    url: str = _key("embedded", "redis://[user:pass@]host:port/db, rediss:// for TLS, or `embedded`")
    embedded_dir: str = _key("var/redis", "data directory of the embedded redis-server")
    embedded_fsync: str = _key("always", "when the embedded redis-server fsyncs its append-only file: always "
                               "(an accepted job is on disk before its 201) or everysec (up to 1 s lost to a crash "
                               "of the machine or of redis-server)")
    sentinel: list = _key([], "sentinel addresses host:port; with master_name replaces url")
    master_name: str = _key("", "sentinel master name")
    cluster_nodes: list = _key([], "host:port of Redis Cluster nodes (cluster mode); replaces url")
    wait_replicas: int = _key(0, "replicas that must confirm a new job before POST /download answers 201",
                              min=0, max=10)
    max_clock_skew_ms: int = _key(250, "offset from the Redis server's clock above which a process warns", min=1)


@dataclass(frozen=True)
class ApiConfig:
    host: str = _key("127.0.0.1", "address the HTTP API listens on")
    port: int = _key(8000, "port the HTTP API listens on", min=0, max=65535)
    heartbeat_path: str = _key("var/disable-api", "while this file exists GET /hb answers 503")
    max_body_bytes: int = _key(1 << 20, "largest accepted request body; larger is 413", min=1)
    batch_max_jobs: int = _key(1000, "most jobs in one POST /download/batch; more is 413", min=1, max=100_000)
    idempotency_ttl: float = _key(86400.0, "seconds an Idempotency-Key is remembered", min=1)


@dataclass(frozen=True)
class DiskConfig:
    high: float = _key(95.0, "percent of the storage filesystem used above which pools pause", min=0, max=100)
    low: float = _key(90.0, "percent used at or below which paused pools resume", min=0, max=100)
    interval: float = _key(60.0, "seconds between disk usage checks", min=0.01)


@dataclass(frozen=True)
class ProcessorConfig:
    storage_dir: str = _key("var/tmp", "directory for partial downloads")
    filestorage: dict = _key({"type": "filesystem", "rootdir": "var/files"}, "where finished files are kept")
    download_url: str = _key("http://localhost:8000/files", "base URL of stored files, put in callbacks")
    request_headers: dict = _key({"User-Agent": "gdl", "Accept": "*/*"}, "headers sent with every download")
    scan_interval: float = _key(3.0, "seconds between fallback scans for aggregations with due work", min=0.01)
    retry_backoff: float = _key(120.0, "seconds; the Nth retry of a download waits N * retry_backoff", min=0)
    max_retries: int = _key(2, "retries of a retriable download error when the job gives none", min=0)
    download_timeout: float = _key(300.0, "seconds for a whole download when the job gives none", min=0.01)
    disk: DiskConfig = field(default_factory=DiskConfig, metadata={"help": "disk health thresholds"})
    lease_ttl: float = _key(30.0, "seconds a lease or in-flight record outlives its process", min=1)
    shutdown_grace: float = _key(8.0, "seconds in-flight downloads and callbacks get to finish at shutdown before "
                                 "they are interrupted and put back (the exit comes within 10 s)", min=0, max=9)
    pool_idle_timeout: float = _key(10.0, "seconds an aggregation pool waits for work before it ends", min=0)
    stats_interval: float = _key(5.0, "seconds between stats reports to Redis", min=0.1)
    chunk_size: int = _key(64 * 1024, "bytes read from the network per chunk", min=1024)
    max_retry_after: float = _key(3600.0, "longest pause an origin's Retry-After sets on an aggregation", min=0)
    max_throttled_attempts: int = _key(10, "throttled responses after which a job fails (throttled: ...)", min=1)
    aimd_window: float = _key(2.0, "seconds: an adaptive limit is cut at most once per window", min=0.01)
    aggr_state_ttl: float = _key(86400.0, "seconds an aggregation's settings and shaping outlive its last job", min=1)
    resume: bool = _key(True, "a retry asks for the rest of a broken download (Range + If-Range) instead of "
                              "starting again")
    resume_min_bytes: int = _key(1024 * 1024, "bytes a failed attempt must have received for its partial file "
                                              "to be kept for the retry", min=1)
    partial_ttl: float = _key(3600.0, "seconds a kept partial file may sit unused in storage_dir before it is "
                                      "removed (its job retried or settled on another host)", min=1)
    reuse_max_ttl: int = _key(7 * 24 * 3600, "seconds: the largest reuse_ttl a job may ask for", min=0)
    cancel_check_interval: float = _key(1.0, "seconds between reads of the cancel marks of the downloads a "
                                        "processor holds (the backstop of a lost cancel message)", min=0.05)


@dataclass(frozen=True)
class NotifierConfig:
    concurrency: int = _key(10, "callbacks delivered at once by one process", min=1)
    deletion_interval: float = _key(180.0, "minutes after a delivered callback before the file is deleted", min=0)

    @property
    def deletion_delay_ms(self) -> int:
        """``deletion_interval`` (minutes, the Go service's unit) in milliseconds."""
        return int(self.deletion_interval * 60_000)
    retry_backoff: float = _key(600.0, "seconds; the Nth retry of a callback waits N * retry_backoff", min=0)
    max_retries: int = _key(2, "retries of a failed callback delivery", min=0)
    signing_secrets: list = _key([], "whsec_ secrets signing every callback (Standard Webhooks v1); all sign, "
                                     "for rotation; empty: unsigned", secret=True)


@dataclass(frozen=True)
class HttpConfig:
    engine: str = _key("curl", "HTTP client of downloads and callbacks: curl (libcurl, via pycurl) or requests")


@dataclass(frozen=True)
class BackendsConfig:
    http: dict = _key({"timeout": 30}, "HTTP callback backend settings")
    kafka: dict = _key({}, "librdkafka settings; empty: Kafka callbacks off")


@dataclass(frozen=True)
class SecurityConfig:
    block_private_networks: bool = _key(True, "refuse URLs resolving to non-public addresses")
    allowed_networks: list = _key([], "CIDRs exempt from block_private_networks")
    max_download_bytes: int = _key(0, "largest download body; 0 means no limit", min=0)
    max_redirects: int = _key(10, "redirect hops followed by a download", min=0)
    api_tokens: list = _key([], "non-empty: POST and DELETE endpoints need Authorization: Bearer <token>")
    api_tokens_read: bool = _key(False, "api_tokens also guard GET endpoints")


@dataclass(frozen=True)
class SentryConfig:
    dsn: str = _key("", "Sentry DSN; empty turns Sentry off")
    environment: str = _key("", "Sentry environment tag")
    release: str = _key("", "Sentry release; empty: gdl's version")


@dataclass(frozen=True)
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    notifier: NotifierConfig = field(default_factory=NotifierConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    backends: BackendsConfig = field(default_factory=BackendsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    sentry: SentryConfig = field(default_factory=SentryConfig)
    # Where the settings came from, for log lines. Relative paths in the file are
    # taken from the directory gdl runs in, as the Procfile expects.
    source: str = "<defaults>"

    @property
    def http_callback_timeout(self) -> float:
        return float(self.backends.http.get("timeout", 30))


def load(path: str | os.PathLike | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (None: defaults only), apply ``GDL_*`` overrides, validate."""
    environ = os.environ if environ is None else environ
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    from_env = _apply_environment(raw, environ)
    try:
        cfg = _build(Config, raw, prefix="")
        _check_relations(cfg)
    except ConfigError as exc:
        raise ConfigError(_name_variables(str(exc), from_env)) from exc
    return dataclasses.replace(cfg, source=str(path) if path else "<defaults>")


def env_name(key: str) -> str:
    """The environment variable that sets the dotted ``key``: ``GDL_PROCESSOR_DISK_HIGH``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def allowed_networks_hint(address: str) -> str:
    """How to let ``address`` past ``security.block_private_networks``, for every refusal message.

    It suggests the loopback network for a loopback address (local testing), and
    the address alone for anything else: a whole private or link-local range (the
    cloud metadata endpoint's) is the operator's decision, not a hint's.
    """
    ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        network = "127.0.0.0/8" if ip.version == 4 else "::1/128"
    else:
        network = f"{ip}/{ip.max_prefixlen}"
    key = "security.allowed_networks"
    return f"security.block_private_networks; to allow it, add {network} to {key} or set {env_name(key)}={network}"


def _name_variables(message: str, from_env: dict[str, str]) -> str:
    """A config error whose keys were set from the environment, saying by which variable.

    The message starts with the key at fault (:class:`ConfigError`'s rule): when the
    environment set it, the variable leads; other keys it names (a relation between
    two keys) are followed by theirs.
    """
    key, sep, rest = message.partition(": ")
    if sep and key in from_env:
        message = f"{from_env[key]} ({key}): {rest}"
    mentioned = [k for k in from_env if k != key and re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", rest)]
    if mentioned:
        message += " (" + ", ".join(f"{k} from {from_env[k]}" for k in mentioned) + ")"
    return message


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}:{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _apply_environment(raw: dict, environ: Mapping[str, str]) -> dict[str, str]:
    """``GDL_PROCESSOR_DISK_HIGH=80`` sets processor.disk.high; values are YAML.

    Returns the dotted keys set, each with its variable's name. A ``GDL_*``
    variable that names no key (and is not one of :data:`OTHER_VARIABLES`) is a
    typo that would otherwise pass unnoticed: a :class:`ConfigError`.
    """
    from_env: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in OTHER_VARIABLES:
            continue
        path = _env_key_path(name[len(ENV_PREFIX):].lower())
        if path is None:
            raise ConfigError(f"{name}: no such setting{_did_you_mean(name, [*_env_names(), *OTHER_VARIABLES])}")
        from_env[".".join(path)] = name
        kind = _leaf_kind(path)
        try:
            parsed = yaml.safe_load(value) if value != "" and kind is not str else value
        except yaml.YAMLError:
            parsed = value
        if not isinstance(parsed, (int, float, bool, list, dict)) or (kind is list and not isinstance(parsed, list)):
            # Strings stay exactly as given (no YAML dates, nulls or quotes), and so does
            # a string key's value that looks like a number (GDL_SENTRY_RELEASE=1.0); a
            # list key's value that is not a YAML list is split on commas (a,b or 12345).
            parsed = value
        node, defaults = raw, Config()
        for part in path[:-1]:
            defaults = getattr(defaults, part) if dataclasses.is_dataclass(defaults) else None
            if not isinstance(node.get(part), dict):
                # One key of a mapping (GDL_PROCESSOR_FILESTORAGE_ROOTDIR) amends the
                # mapping's default rather than replacing it with that key alone.
                node[part] = dict(defaults) if isinstance(defaults, dict) else {}
            node = node[part]
        node[path[-1]] = parsed
    return from_env


def _env_names(cls: Any = Config, prefix: str = ENV_PREFIX) -> list[str]:
    """Every variable that names a key: the schema's leaves, and the keys of mappings' defaults."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        name, sub = prefix + f.name.upper(), _field_type(cls, f.name)
        if dataclasses.is_dataclass(sub):
            out += _env_names(sub, name + "_")
        else:
            out.append(name)
            if sub is dict:
                out += [f"{name}_{k}".upper() for k in getattr(cls(), f.name)]
    return out


def _did_you_mean(name: str, candidates: list[str], prefix: str = "") -> str:
    """``"; did you mean <prefix><closest>?"``, or nothing when no candidate is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _env_key_path(rest: str, cls: Any = Config) -> list[str] | None:
    """Match ``processor_disk_high`` against the schema, longest key first."""
    names = sorted((f.name for f in dataclasses.fields(cls) if f.name != "source"), key=len, reverse=True)
    for name in names:
        if rest == name:
            return [name]
        if rest.startswith(name + "_"):
            sub = _field_type(cls, name)
            tail = rest[len(name) + 1:]
            if dataclasses.is_dataclass(sub):
                found = _env_key_path(tail, sub)
                if found:
                    return [name, *found]
            elif sub is dict:
                return [name, tail]
    return None


def _leaf_kind(path: list[str]) -> type | None:
    """The schema type of the key at ``path``; None inside a free-form mapping."""
    cls: Any = Config
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = _field_type(cls, part)
    return cls


def _field_type(cls: Any, name: str) -> Any:
    """A field's kind: its dataclass for a section, else the type of its default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is dataclasses.MISSING:
        return type(f.default)
    if dataclasses.is_dataclass(f.default_factory):
        return f.default_factory
    return type(f.default_factory())


def _build(cls: Any, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{prefix}{name}: unknown key{_did_you_mean(str(name), list(known), prefix)}")
    values = {}
    for name, f in known.items():
        key = prefix + name
        sub = _field_type(cls, name)
        if dataclasses.is_dataclass(sub):
            values[name] = _build(sub, raw.get(name), key + ".")
        elif name in raw:
            values[name] = _coerce(key, raw[name], f, sub)
    return cls(**values)


def _coerce(key: str, value: Any, f: dataclasses.Field, kind: type) -> Any:
    try:
        coerce = _COERCERS[kind]
    except KeyError:  # pragma: no cover - the schema uses only the kinds below
        raise AssertionError(kind) from None
    return coerce(key, value, f, kind)


def _as_bool(key: str, value: Any, _f: dataclasses.Field, _kind: type) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false (got {value!r})")
    return value


def _as_number(key: str, value: Any, f: dataclasses.Field, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: must be a number (got {value!r})")
    if kind is int and value != int(value):
        raise ConfigError(f"{key}: must be a whole number (got {value!r})")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{key}: must be {bounds} (got {value!r})")
    return kind(value)


def _as_str(key: str, value: Any, _f: dataclasses.Field, _kind: type) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string (got {value!r})")
    return value


def _as_list(key: str, value: Any, f: dataclasses.Field, _kind: type) -> list:
    if isinstance(value, str):  # from the environment: comma-separated
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        got = type(value).__name__ if f.metadata.get("secret") else repr(value)  # a secret is never echoed
        raise ConfigError(f"{key}: must be a list (got {got})")
    return list(value)


def _as_dict(key: str, value: Any, _f: dataclasses.Field, _kind: type) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping (got {value!r})")
    return dict(value)


_COERCERS = {bool: _as_bool, int: _as_number, float: _as_number, str: _as_str, list: _as_list, dict: _as_dict}


def _check_relations(cfg: Config) -> None:
    """Checks that involve more than one key or a value's inner shape."""
    from gdl.config_storage import check_filestorage

    _check_redis(cfg.redis)
    if cfg.processor.disk.low > cfg.processor.disk.high:
        raise ConfigError("processor.disk.low: must not be above processor.disk.high")
    check_filestorage(cfg.processor.filestorage)
    if urlsplit(cfg.processor.download_url).scheme not in ("http", "https"):
        raise ConfigError(f"processor.download_url: must be an http(s) URL (got {cfg.processor.download_url!r})")
    for name, value in cfg.processor.request_headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(f"processor.request_headers.{name}: header values must be strings")
    _check_engine(cfg.http.engine)
    timeout = cfg.backends.http.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"backends.http.timeout: must be a number > 0 (got {timeout!r})")
    _check_security(cfg.security)
    signing.parse_secrets(cfg.notifier.signing_secrets)


def _check_redis(redis: RedisConfig) -> None:
    url = redis.url
    if url != "embedded" and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"redis.url: must be `embedded` or a redis://, rediss:// or unix:// URL (got {url!r})")
    if redis.embedded_fsync not in EMBEDDED_FSYNC:
        raise ConfigError(f"redis.embedded_fsync: must be {' or '.join(EMBEDDED_FSYNC)} (got {redis.embedded_fsync!r})")
    if redis.sentinel and not redis.master_name:
        raise ConfigError("redis.master_name: required when redis.sentinel is set")
    for key in ("sentinel", "cluster_nodes"):
        for addr in getattr(redis, key):
            host, _, port = str(addr).rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"redis.{key}: {addr!r} is not host:port")
    if redis.cluster_nodes and redis.sentinel:
        raise ConfigError("redis.cluster_nodes: a Redis Cluster has no sentinels; set one of the two")
    if redis.cluster_nodes and redis.wait_replicas:
        raise ConfigError("redis.wait_replicas: not supported with redis.cluster_nodes (WAIT names no key)")


def _check_security(security: SecurityConfig) -> None:
    for cidr in security.allowed_networks:
        try:
            ipaddress.ip_network(str(cidr), strict=False)
        except ValueError as exc:
            raise ConfigError(f"security.allowed_networks: {cidr!r} is not a CIDR") from exc
    for token in security.api_tokens:
        if not isinstance(token, str) or not token:
            raise ConfigError("security.api_tokens: tokens must be non-empty strings")


def _check_engine(name: str) -> None:
    """``http.engine`` names an engine, and its library imports here."""
    from gdl import http

    if name not in http.ENGINES:
        raise ConfigError(f"http.engine: must be {' or '.join(http.ENGINES)} (got {name!r})")
    why = http.unavailable(name)
    if why is not None:
        package = http.ENGINES[name][2]
        raise ConfigError(f"http.engine: {name} cannot run: {why}; install it (pip install {package}) "
                          "or set http.engine: requests")
