"""Mime types: a job's ``mime_type`` patterns, content sniffing and image size.

- :class:`MimePatterns` matches a sniffed type against a job's comma-separated
  globs, ``!`` negating (``"!image/vnd.adobe.photoshop,image/*"``), with the
  semantics of the Go downloader.
- :func:`sniff` names the type of a body from its first bytes (libmagic).
- :func:`image_size` reads ``"WxH"`` from the header of a jpeg, png or gif
  file without decoding its pixels.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from PIL import GifImagePlugin, ImageFile, JpegImagePlugin, PngImagePlugin

from gdl.errors import InvalidImage, StartupError, StorageError, ValidationError

INSTALL_LIBMAGIC = "install it with `apt-get install libmagic1` (Debian, Ubuntu) or `brew install libmagic` (macOS)"

try:
    import magic
except ImportError as _exc:  # python-magic's loader found no libmagic, or python-magic is not installed
    # One line for the operator (the CLI prints a StartupError and exits 2), not a traceback.
    if isinstance(_exc, ModuleNotFoundError) and _exc.name == "magic":
        raise StartupError("python-magic is not installed: pip install python-magic") from _exc
    raise StartupError(f"libmagic, needed to sniff mime types, cannot be loaded ({_exc}): {INSTALL_LIBMAGIC}") \
        from _exc

log = logging.getLogger(__name__)

_MIME_PART_RE = re.compile(r"^[A-Za-z0-9*?\[\]!.+_-]+/[A-Za-z0-9*?\[\]!.+_-]+$")


def check_mime_patterns(value: str) -> list[tuple[bool, str]]:
    """Split ``"!image/vnd.adobe.photoshop,image/*"`` into (negated, glob) pairs."""
    out = []
    for raw in value.split(","):
        part = raw.strip()
        negated = part.startswith("!")
        glob = part[1:] if negated else part
        if not glob or not _MIME_PART_RE.match(glob):
            raise ValidationError("mime_type", f"{raw.strip()!r} is not a type/subtype pattern")
        try:
            fnmatch.translate(glob)
        except re.error as exc:  # pragma: no cover - translate escapes nearly everything
            raise ValidationError("mime_type", f"{glob!r}: {exc}") from exc
        out.append((negated, glob.lower()))
    return out

# Bytes of a body that sniffing needs; the downloader reads at least this many
# before it checks a job's patterns.
SNIFF_BYTES = 2048

# The formats whose size a job can ask for, by sniffed mime type. The plugin
# classes are used directly, not through ``Image.open``: it would refuse very
# large images as decompression bombs, a concern of decoding, which we never do.
_SIZED_IMAGES: dict[str, type[ImageFile.ImageFile]] = {
    "image/jpeg": JpegImagePlugin.JpegImageFile,
    "image/png": PngImagePlugin.PngImageFile,
    "image/gif": GifImagePlugin.GifImageFile,
}

# What Pillow's plugins raise on a header they cannot parse.
_PILLOW_PARSE_ERRORS = (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, OSError)


@dataclass(frozen=True)
class MimePatterns:
    """A job's ``mime_type``: positive and negated globs, lower-cased."""

    allowed: tuple[str, ...]
    excluded: tuple[str, ...]

    @classmethod
    def parse(cls, value: str) -> MimePatterns:
        """Parse ``"!image/png,image/*"``; raises :class:`~gdl.errors.ValidationError`."""
        pairs = check_mime_patterns(value)
        return cls(
            allowed=tuple(glob for negated, glob in pairs if not negated),
            excluded=tuple(glob for negated, glob in pairs if negated),
        )

    def matches(self, mime: str) -> bool:
        """True when ``mime`` matches no negated glob and, if any are given, a positive one.

        Only negated globs (``"!image/png"``) means "anything but these".
        Parameters (``; charset=binary``) and case are ignored.
        """
        essence = media_type(mime)
        if any(fnmatch.fnmatchcase(essence, glob) for glob in self.excluded):
            return False
        if not self.allowed:
            return True
        return any(fnmatch.fnmatchcase(essence, glob) for glob in self.allowed)


def media_type(mime: str) -> str:
    """``"Text/HTML; charset=utf-8"`` -> ``"text/html"``."""
    return mime.split(";", 1)[0].strip().lower()


_magic: magic.Magic | None = None


def sniff(head: bytes) -> str:
    """The mime type of a body from its first bytes (at least :data:`SNIFF_BYTES` when there are)."""
    global _magic
    # One libmagic handle per process, made on first use. It is not thread-safe,
    # but a call never yields to another greenlet, so under gevent it is never shared.
    if _magic is None:
        _magic = magic.Magic(mime=True)
    return media_type(_magic.from_buffer(head))


def check_libmagic() -> None:
    """Load libmagic and its database now, so that a broken install stops gdl at start, in one line."""
    try:
        sniff(b"GIF89a")
    except magic.MagicException as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise StartupError(f"libmagic cannot load its database ({detail}): {INSTALL_LIBMAGIC}") from exc


def image_size(source: str | bytes, mime: str) -> str | None:
    """``"WxH"`` of a jpeg, png or gif file (its path, or its bytes), read from
    its header; None for other types.

    ``mime`` is the sniffed type. A file sniffed as one of the three that Pillow
    cannot parse raises :class:`~gdl.errors.InvalidImage`.
    """
    plugin = _SIZED_IMAGES.get(media_type(mime))
    if plugin is None:
        return None
    if isinstance(source, bytes):
        width, height = _header_size(plugin, io.BytesIO(source), "", mime)
    else:
        try:
            with open(source, "rb") as fp:
                width, height = _header_size(plugin, fp, source, mime)
        except OSError as exc:  # opening or closing our own file; Pillow's OSErrors are handled inside
            raise StorageError(f"cannot read {source}: {exc.strerror}") from exc
    return f"{width}x{height}"


def _header_size(plugin: type[ImageFile.ImageFile], fp: BinaryIO, path: str, mime: str) -> tuple[int, int]:
    try:
        width, height = plugin(fp, path).size
    except _PILLOW_PARSE_ERRORS as exc:
        raise InvalidImage(f"cannot read the size of the {mime} image: {exc}") from exc
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the {mime} image declares an empty size {width}x{height}")
    return width, height
