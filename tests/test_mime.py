"""gdl.mime: pattern matching, sniffing, image size from headers."""

from __future__ import annotations

import pytest

from gdl import mime
from gdl.errors import InvalidImage, ValidationError
from tests.samples import broken_png, image_bytes, png_header_only, tiny_pdf


@pytest.mark.parametrize("patterns, found, expected", [
    ("image/*", "image/png", True),
    ("image/*", "text/html", False),
    ("image/png", "IMAGE/PNG", True),
    ("image/png", "image/png; charset=binary", True),
    ("!image/png,image/*", "image/png", False),
    ("!image/png,image/*", "image/jpeg", True),
    ("!image/png,image/*", "application/pdf", False),
    ("image/*,!image/png", "image/png", False),  # order does not matter
    ("!image/vnd.adobe.photoshop,image/*", "image/vnd.adobe.photoshop", False),
    ("!image/png", "application/pdf", True),  # only negations: anything not excluded
    ("!image/png", "image/png", False),
    ("!image/*,!text/*", "application/pdf", True),
    ("application/pdf, image/jpeg", "image/jpeg", True),  # spaces around commas
    ("Image/JPEG", "image/jpeg", True),
    ("image/jp?g", "image/jpeg", True),
])
def test_patterns_match_like_the_go_downloader(patterns: str, found: str, expected: bool) -> None:
    assert mime.MimePatterns.parse(patterns).matches(found) is expected


def test_parse_splits_allowed_and_excluded() -> None:
    parsed = mime.MimePatterns.parse("!image/PNG,image/*")
    assert parsed.allowed == ("image/*",)
    assert parsed.excluded == ("image/png",)


@pytest.mark.parametrize("bad", ["image", "", "image/png,", "!", "text/html;q=1"])
def test_parse_rejects_bad_patterns(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        mime.MimePatterns.parse(bad)
    assert info.value.field == "mime_type"


@pytest.mark.parametrize("body, expected", [
    (image_bytes("PNG", 4, 4), "image/png"),
    (image_bytes("JPEG", 4, 4), "image/jpeg"),
    (image_bytes("GIF", 4, 4), "image/gif"),
    (tiny_pdf(), "application/pdf"),
    (b"just some words\n", "text/plain"),
    (b"", "application/x-empty"),
])
def test_sniff_names_the_content(body: bytes, expected: str) -> None:
    assert mime.sniff(body) == expected


@pytest.mark.parametrize("fmt, mime_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif")])
def test_image_size_reads_the_header(tmp_path, fmt: str, mime_type: str) -> None:
    path = tmp_path / "img"
    path.write_bytes(image_bytes(fmt, 13, 7))
    assert mime.image_size(str(path), mime_type) == "13x7"


def test_image_size_of_a_huge_image_is_read_without_decoding(tmp_path) -> None:
    # 600 megapixels: Image.open would refuse it as a decompression bomb.
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(30000, 20000))
    assert mime.image_size(str(path), "image/png") == "30000x20000"


def test_image_size_is_none_for_other_types(tmp_path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(tiny_pdf())
    assert mime.image_size(str(path), "application/pdf") is None
    assert mime.image_size(str(path), "image/webp") is None


def test_broken_image_header_is_invalid_image(tmp_path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(broken_png())
    with pytest.raises(InvalidImage, match="bad header checksum") as info:
        mime.image_size(str(path), mime.sniff(path.read_bytes()))
    assert info.value.retriable is False
    assert info.value.phase == "image"


def test_content_not_matching_its_sniffed_type_is_invalid_image(tmp_path) -> None:
    path = tmp_path / "liar"
    path.write_bytes(image_bytes("GIF", 3, 3))
    with pytest.raises(InvalidImage):
        mime.image_size(str(path), "image/png")
