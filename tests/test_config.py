"""Configuration: the contract's defaults, the YAML file, GDL_* overrides, and
every kind of bad value refused with a message that starts with its dotted key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from gdl import config
from gdl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, data: object = None, text: str | None = None, **environ: str) -> config.Config:
    """Load ``data`` (dumped as YAML) or raw ``text`` from a file, with ``environ``."""
    path = tmp_path / "gdl.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return config.load(path, environ=environ)


def refused(tmp_path: Path, data: object = None, text: str | None = None, **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, text, **environ)
    return str(info.value)


# --------------------------------------------------------------------------- defaults

CONTRACT_DEFAULTS = {
    "redis": {"url": "embedded", "embedded_dir": "var/redis", "sentinel": [], "master_name": ""},
    "api": {"host": "127.0.0.1", "port": 8000, "heartbeat_path": "var/disable-api"},
    "processor": {
        "storage_dir": "var/tmp",
        "filestorage": {"type": "filesystem", "rootdir": "var/files"},
        "download_url": "http://localhost:8000/files",
        "request_headers": {"User-Agent": "gdl", "Accept": "*/*"},
        "scan_interval": 3,
        "retry_backoff": 120,
        "max_retries": 2,
        "download_timeout": 300,
        "disk": {"high": 95, "low": 90, "interval": 60},
    },
    "notifier": {"concurrency": 10, "deletion_interval": 180, "retry_backoff": 600, "max_retries": 2},
    "http": {"engine": "curl"},
    "backends": {"http": {"timeout": 30}},
    "security": {"block_private_networks": True, "allowed_networks": [], "max_download_bytes": 0,
                 "max_redirects": 10, "api_tokens": []},
    "sentry": {"dsn": ""},
}


def without_source(cfg: config.Config) -> dict:
    data = dataclasses.asdict(cfg)
    data.pop("source")
    return data


@pytest.mark.parametrize("section", sorted(CONTRACT_DEFAULTS))
def test_defaults_match_the_contract(section: str) -> None:
    cfg = config.load(None, environ={})
    actual = dataclasses.asdict(getattr(cfg, section))
    for key, expected in CONTRACT_DEFAULTS[section].items():
        assert actual[key] == expected, f"{section}.{key}"
    assert cfg.source == "<defaults>"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, text="")
    assert without_source(cfg) == without_source(config.load(None, environ={}))


def test_shipped_example_config_is_the_defaults() -> None:
    """etc/gdl.yaml says its values are the defaults: hold it to that."""
    shipped = config.load(ROOT / "etc" / "gdl.yaml", environ={})
    assert without_source(shipped) == without_source(config.load(None, environ={}))


def test_config_is_frozen() -> None:
    cfg = config.load(None, environ={})
    with pytest.raises(AttributeError):
        cfg.api.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- file and environment

def test_file_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, {
        "redis": {"url": "redis://db.internal:6380/3"},
        "api": {"host": "0.0.0.0", "port": 9000, "heartbeat_path": "/run/gdl-off"},
        "processor": {"storage_dir": "/data/tmp", "max_retries": 5, "retry_backoff": 1.5,
                      "filestorage": {"type": "s3", "bucket": "files", "region": "eu-west-1"},
                      "disk": {"high": 80, "low": 70, "interval": 5}},
        "notifier": {"concurrency": 3, "deletion_interval": 1},
        "backends": {"http": {"timeout": 4}},
        "security": {"allowed_networks": ["10.0.0.0/8", "fd00::/8"], "api_tokens": ["t1"],
                     "block_private_networks": False},
        "sentry": {"dsn": "https://key@sentry.example/1"},
    })
    assert cfg.source == str(tmp_path / "gdl.yaml")
    assert cfg.redis.url == "redis://db.internal:6380/3"
    assert (cfg.api.host, cfg.api.port, cfg.api.heartbeat_path) == ("0.0.0.0", 9000, "/run/gdl-off")
    assert cfg.processor.storage_dir == "/data/tmp"
    assert cfg.processor.max_retries == 5 and isinstance(cfg.processor.max_retries, int)
    assert cfg.processor.retry_backoff == 1.5
    assert cfg.processor.filestorage == {"type": "s3", "bucket": "files", "region": "eu-west-1"}
    assert (cfg.processor.disk.high, cfg.processor.disk.low, cfg.processor.disk.interval) == (80, 70, 5)
    assert cfg.processor.scan_interval == 3  # untouched keys keep their defaults
    assert (cfg.notifier.concurrency, cfg.notifier.deletion_interval, cfg.notifier.max_retries) == (3, 1, 2)
    assert cfg.http_callback_timeout == 4
    assert cfg.security.allowed_networks == ["10.0.0.0/8", "fd00::/8"]
    assert cfg.security.api_tokens == ["t1"]
    assert cfg.security.block_private_networks is False
    assert cfg.sentry.dsn == "https://key@sentry.example/1"


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {"redis": {"url": "redis://file:6379/0"}, "api": {"port": 9000}, "processor": {"disk": {"high": 90}}},
        GDL_REDIS_URL="redis://env:6379/1",
        GDL_API_PORT="9100",
        GDL_PROCESSOR_DISK_HIGH="97",
        GDL_PROCESSOR_DISK_LOW="85.5",
        GDL_SECURITY_API_TOKENS="a,b",
        GDL_SECURITY_BLOCK_PRIVATE_NETWORKS="false",
        GDL_SENTRY_DSN="https://abc@o1.ingest.sentry.io/42",
        GDL_LOG_LEVEL="debug",  # GDL_ variables that are no config key but are read elsewhere are left alone
        GDL_SCREENSHOTS="docs",
        OTHER_API_PORT="1",
    )
    assert cfg.redis.url == "redis://env:6379/1"
    assert cfg.api.port == 9100
    assert (cfg.processor.disk.high, cfg.processor.disk.low) == (97, 85.5)
    assert cfg.security.api_tokens == ["a", "b"]
    assert cfg.security.block_private_networks is False
    assert cfg.sentry.dsn == "https://abc@o1.ingest.sentry.io/42"


@pytest.mark.parametrize(("name", "value", "attr", "expected"), [
    # string keys stay the string given, even when it reads as YAML
    ("GDL_SENTRY_RELEASE", "1.0", ("sentry", "release"), "1.0"),
    ("GDL_SENTRY_ENVIRONMENT", "2024", ("sentry", "environment"), "2024"),
    ("GDL_REDIS_MASTER_NAME", "yes", ("redis", "master_name"), "yes"),
    ("GDL_SENTRY_DSN", "null", ("sentry", "dsn"), "null"),
    ("GDL_SENTRY_DSN", "", ("sentry", "dsn"), ""),
    ("GDL_API_HOST", "::1", ("api", "host"), "::1"),
    # lists: comma-separated, or a YAML list; one token of digits is still a token
    ("GDL_SECURITY_API_TOKENS", "12345", ("security", "api_tokens"), ["12345"]),
    ("GDL_SECURITY_API_TOKENS", "[x, y]", ("security", "api_tokens"), ["x", "y"]),
    ("GDL_SECURITY_ALLOWED_NETWORKS", "127.0.0.0/8, ::1/128", ("security", "allowed_networks"),
     ["127.0.0.0/8", "::1/128"]),
    # one key of a mapping amends that mapping's default
    ("GDL_PROCESSOR_FILESTORAGE_ROOTDIR", "/srv/files", ("processor", "filestorage"),
     {"type": "filesystem", "rootdir": "/srv/files"}),
    ("GDL_BACKENDS_HTTP_TIMEOUT", "5", ("backends", "http"), {"timeout": 5}),
    ("GDL_PROCESSOR_MAX_RETRIES", "0", ("processor", "max_retries"), 0),
    ("GDL_HTTP_ENGINE", "requests", ("http", "engine"), "requests"),
])
def test_environment_values(name: str, value: str, attr: tuple[str, str], expected: object) -> None:
    cfg = config.load(None, environ={name: value})
    assert getattr(getattr(cfg, attr[0]), attr[1]) == expected


# --------------------------------------------------------------------------- bad values

BAD_FILES = [
    # wrong type
    ({"api": {"port": "eighty"}}, "api.port:"),
    ({"api": {"port": True}}, "api.port:"),
    ({"processor": {"max_retries": 1.5}}, "processor.max_retries:"),
    ({"processor": {"scan_interval": [1]}}, "processor.scan_interval:"),
    ({"security": {"block_private_networks": "yes please"}}, "security.block_private_networks:"),
    ({"security": {"api_tokens": 5}}, "security.api_tokens:"),
    ({"security": {"api_tokens": [""]}}, "security.api_tokens:"),
    ({"redis": {"url": 6379}}, "redis.url:"),
    ({"processor": {"filestorage": "var/files"}}, "processor.filestorage:"),
    ({"processor": {"disk": 95}}, "processor.disk:"),
    ({"processor": {"request_headers": {"X-Retries": 3}}}, "processor.request_headers.X-Retries:"),
    ({"api": "localhost"}, "api:"),
    ({"backends": {"http": {"timeout": "soon"}}}, "backends.http.timeout:"),
    # out of bounds
    ({"processor": {"disk": {"high": 150}}}, "processor.disk.high:"),
    ({"processor": {"disk": {"low": -1}}}, "processor.disk.low:"),
    ({"processor": {"disk": {"interval": 0}}}, "processor.disk.interval:"),
    ({"api": {"port": 70000}}, "api.port:"),
    ({"notifier": {"concurrency": 0}}, "notifier.concurrency:"),
    ({"processor": {"max_retries": -1}}, "processor.max_retries:"),
    ({"security": {"max_download_bytes": -5}}, "security.max_download_bytes:"),
    ({"backends": {"http": {"timeout": 0}}}, "backends.http.timeout:"),
    # unknown keys
    ({"api": {"prot": 8000}}, "api.prot:"),
    ({"processor": {"disk": {"hihg": 90}}}, "processor.disk.hihg:"),
    ({"apis": {}}, "apis:"),
    ({"source": "x"}, "source:"),
    # relations and inner shapes
    ({"processor": {"disk": {"high": 80, "low": 85}}}, "processor.disk.low:"),
    ({"redis": {"url": "http://localhost:6379"}}, "redis.url:"),
    ({"redis": {"url": "localhost:6379"}}, "redis.url:"),
    ({"redis": {"sentinel": ["s1:26379"]}}, "redis.master_name:"),
    ({"redis": {"embedded_fsync": "no"}}, "redis.embedded_fsync:"),
    ({"redis": {"sentinel": ["s1"], "master_name": "m"}}, "redis.sentinel:"),
    ({"processor": {"filestorage": {"type": "ftp", "rootdir": "x"}}}, "processor.filestorage.type:"),
    ({"processor": {"filestorage": {"rootdir": "x"}}}, "processor.filestorage.type:"),
    ({"processor": {"filestorage": {"type": "filesystem"}}}, "processor.filestorage.rootdir:"),
    ({"processor": {"filestorage": {"type": "s3", "region": "eu-west-1"}}}, "processor.filestorage.bucket:"),
    ({"processor": {"download_url": "files.example.com"}}, "processor.download_url:"),
    ({"security": {"allowed_networks": ["10.0.0.0/33"]}}, "security.allowed_networks:"),
    ({"security": {"allowed_networks": ["intranet"]}}, "security.allowed_networks:"),
    ({"http": {"engine": "urllib3"}}, "http.engine:"),
    ({"http": {"engine": 1}}, "http.engine:"),
]


@pytest.mark.parametrize(("data", "key"), BAD_FILES, ids=[k + str(i) for i, (_, k) in enumerate(BAD_FILES)])
def test_bad_value_names_its_key(tmp_path: Path, data: dict, key: str) -> None:
    message = refused(tmp_path, data)
    assert message.startswith(key), message
    assert "\n" not in message


@pytest.mark.parametrize(("name", "value", "key"), [
    ("GDL_PROCESSOR_DISK_HIGH", "high", "processor.disk.high:"),
    ("GDL_PROCESSOR_DISK_HIGH", "80", "processor.disk.low:"),  # default low 90 is now above high
    ("GDL_API_PORT", "", "api.port:"),
    ("GDL_API_PORT", "99999", "api.port:"),
    ("GDL_REDIS_URL", "mysql://db/1", "redis.url:"),
    ("GDL_SECURITY_ALLOWED_NETWORKS", "10.0.0.0/8,nope", "security.allowed_networks:"),
    ("GDL_SECURITY_BLOCK_PRIVATE_NETWORKS", "maybe", "security.block_private_networks:"),
])
def test_bad_environment_value_names_its_variable_and_key(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, environ={name: value})
    message = str(info.value)
    assert name in message, message
    assert key.rstrip(":") in message, message
    assert "\n" not in message


def test_an_environment_value_at_fault_leads_with_its_variable() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, environ={"GDL_PROCESSOR_DISK_HIGH": "high"})
    assert str(info.value) == "GDL_PROCESSOR_DISK_HIGH (processor.disk.high): must be a number (got 'high')"


def test_a_relation_names_the_variable_that_set_the_other_key() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, environ={"GDL_PROCESSOR_DISK_HIGH": "80"})
    assert str(info.value) == ("processor.disk.low: must not be above processor.disk.high "
                               "(processor.disk.high from GDL_PROCESSOR_DISK_HIGH)")


@pytest.mark.parametrize(("name", "message"), [
    ("GDL_PROCESOR_DISK_HIGH", "GDL_PROCESOR_DISK_HIGH: no such setting; did you mean GDL_PROCESSOR_DISK_HIGH?"),
    ("GDL_REDIS_ULR", "GDL_REDIS_ULR: no such setting; did you mean GDL_REDIS_URL?"),
    ("GDL_SECURITY_ALLOWED_NETWORK", "GDL_SECURITY_ALLOWED_NETWORK: no such setting; "
                                     "did you mean GDL_SECURITY_ALLOWED_NETWORKS?"),
    ("GDL_LOG_LEVL", "GDL_LOG_LEVL: no such setting; did you mean GDL_LOG_LEVEL?"),
    ("GDL_ZZZZZZZZZZZZZZZZZZZZZZ", "GDL_ZZZZZZZZZZZZZZZZZZZZZZ: no such setting"),
])
def test_unknown_gdl_variable_is_an_error_suggesting_the_closest(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, environ={name: "80"})
    assert str(info.value) == message


def test_a_typo_in_a_storage_key_from_the_environment_is_caught() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, environ={"GDL_PROCESSOR_FILESTORAGE_ROOTDRI": "/srv"})
    assert str(info.value) == ("GDL_PROCESSOR_FILESTORAGE_ROOTDRI (processor.filestorage.rootdri): unknown key for "
                               "filesystem storage; did you mean processor.filestorage.rootdir?")


@pytest.mark.parametrize(("data", "message"), [
    ({"processor": {"disk": {"hihg": 90}}}, "processor.disk.hihg: unknown key; did you mean processor.disk.high?"),
    ({"procesor": {}}, "procesor: unknown key; did you mean processor?"),
    ({"api": {"prot": 8000}}, "api.prot: unknown key; did you mean api.port?"),
    ({"api": {"zzzzzz": 1}}, "api.zzzzzz: unknown key"),
    ({"processor": {"filestorage": {"type": "s3", "bucket": "b", "regoin": "r"}}},
     "processor.filestorage.regoin: unknown key for s3 storage; did you mean processor.filestorage.region?"),
])
def test_unknown_key_suggests_the_closest(tmp_path: Path, data: dict, message: str) -> None:
    assert refused(tmp_path, data) == message


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    message = refused(tmp_path, text="api:\n  port: 8000\n  host: [unclosed\n")
    assert message.startswith(str(tmp_path / "gdl.yaml")), message
    assert "not valid YAML" in message
    assert "line " in message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    message = refused(tmp_path, text="- api\n- processor\n")
    assert message.startswith(str(tmp_path / "gdl.yaml")), message
    assert "mapping" in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert str(info.value).startswith(str(path)), str(info.value)
    assert "No such file" in str(info.value)
