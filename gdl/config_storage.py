"""Validation of ``processor.filestorage``: its type's keys and their values
(moved out of :mod:`gdl.config`, which keeps every other check and imports
this when it runs them)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gdl.config import _did_you_mean
from gdl.errors import ConfigError


def check_filestorage(fs: dict) -> None:
    kind = fs.get("type")
    if kind == "filesystem":
        _known_keys("processor.filestorage", fs, ("type", "rootdir"), "filesystem")
        if not isinstance(fs.get("rootdir"), str) or not fs["rootdir"]:
            raise ConfigError("processor.filestorage.rootdir: required for filesystem storage")
    elif kind == "s3":
        # rootdir is tolerated: the default mapping carries it, and GDL_PROCESSOR_FILESTORAGE_TYPE=s3
        # amends that default rather than replacing it.
        _known_keys("processor.filestorage", fs, ("type", "bucket", "region", "endpoint_url", "rootdir"), "s3")
        for name in ("bucket", "region"):
            if not isinstance(fs.get(name), str) or not fs[name]:
                raise ConfigError(f"processor.filestorage.{name}: required for s3 storage")
        _check_endpoint(fs.get("endpoint_url"))
    else:
        raise ConfigError(f"processor.filestorage.type: must be filesystem or s3 (got {kind!r})")


def _check_endpoint(endpoint: Any) -> None:
    if endpoint is None or endpoint == "":
        return
    if not isinstance(endpoint, str) or urlsplit(endpoint).scheme not in ("http", "https") \
            or not urlsplit(endpoint).hostname:
        raise ConfigError(f"processor.filestorage.endpoint_url: must be an http(s) URL (got {endpoint!r})")


def _known_keys(key: str, mapping: dict, names: tuple[str, ...], kind: str) -> None:
    for name in mapping:
        if name not in names:
            raise ConfigError(f"{key}.{name}: unknown key for {kind} storage"
                              f"{_did_you_mean(str(name), list(names), key + '.')}")
