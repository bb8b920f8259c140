"""How ingest_file cuts a file into append requests: the parts add up to the file, each is valid UTF-8 and ends where
cutting leaves the tokens as they are (a line break between visible characters) whenever the file has one."""

from __future__ import annotations

import io

import pytest

from famserve.clients.client import _file_parts

LINES = "".join(f"line {i} of the notes.\n" for i in range(400)).encode()
PARAGRAPHS = "".join(f"paragraph {i}.\n\n  indented\n" for i in range(200)).encode()
NO_BREAKS = ("ünïcödé ✓ 字 " * 500).encode()  # two- and three-byte characters, no line break at all


def parts(data: bytes, chunk_bytes: int, part_bytes: int) -> list[bytes]:
    return [b"".join(part) for part in _file_parts(io.BytesIO(data), chunk_bytes, part_bytes)]


@pytest.mark.parametrize("data", [LINES, PARAGRAPHS, NO_BREAKS], ids=["lines", "paragraphs", "no-breaks"])
@pytest.mark.parametrize("chunk_bytes, part_bytes", [(64, 256), (100, 1000), (4096, 4096), (1 << 16, 1 << 20)])
def test_parts_add_up_to_valid_text(data: bytes, chunk_bytes: int, part_bytes: int) -> None:
    cut = parts(data, chunk_bytes, part_bytes)
    assert b"".join(cut) == data
    for part in cut:
        part.decode("utf-8")  # never half a character
        assert 0 < len(part) < part_bytes + chunk_bytes
    if len(data) > part_bytes + chunk_bytes:
        assert len(cut) > 1


@pytest.mark.parametrize("data", [LINES, PARAGRAPHS], ids=["lines", "paragraphs"])
def test_parts_end_between_visible_characters(data: bytes) -> None:
    cut = parts(data, 128, 512)
    for part, following in zip(cut, cut[1:]):
        assert part.endswith(b"\n") and not part[-2:-1].isspace() and not following[:1].isspace()


def test_an_empty_file_has_no_parts() -> None:
    assert parts(b"", 64, 256) == []


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_bytes and part_bytes must be positive"):
        parts(LINES, 0, 256)
