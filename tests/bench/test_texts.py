"""bench/texts.py's SWORD reader on small modules written here in the packages' format (the real ones come from
Debian packages this suite cannot download): every entry once and in order, markup reduced to text, both index
widths, the module found through its .conf."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import texts  # noqa: E402


def write_module(folder: Path, testament: str, letter: str, blocks: list[list[str]], entries: list[tuple[int, int]],
                 wide: bool) -> None:
    """Blocks of entries (strings), and the verse index as (block, entry within the block) pairs; (-1, -1) is an
    empty slot."""
    folder.mkdir(parents=True, exist_ok=True)
    data, block_index, places = b"", b"", {}
    for b, block in enumerate(blocks):
        raw = b""
        for e, text in enumerate(block):
            places[(b, e)] = (len(raw), len(text.encode()))
            raw += text.encode()
        packed = zlib.compress(raw)
        block_index += struct.pack("<III", len(data), len(packed), len(raw))
        data += packed
    index = b""
    for b, e in entries:
        offset, size = places.get((b, e), (0, 0))
        index += struct.pack("<III" if wide else "<IIH", max(b, 0), offset, size)
    (folder / f"{testament}.{letter}zs").write_bytes(block_index)
    (folder / f"{testament}.{letter}zz").write_bytes(data)
    (folder / f"{testament}.{letter}zv").write_bytes(index)


def test_text_module_reads_every_verse_in_order_as_plain_text(tmp_path):
    write_module(tmp_path, "ot", "b", [
        ['<title type="main">The First Book</title>In the beginning<note n="a">a footnote</note> was light.',
         "And it was <w lemma=\"x\">good</w> &amp; bright."],
        ["Second block, first verse."],
    ], [(-1, -1), (0, 0), (0, 1), (1, 0)], wide=False)
    write_module(tmp_path, "nt", "b", [["A new <divineName>Testament</divineName>."]], [(0, 0)], wide=False)
    assert texts.sword_text(tmp_path, "zText") == (
        "The First Book\nIn the beginning was light.\nAnd it was good & bright.\nSecond block, first verse.\n"
        "A new Testament.\n")


def test_commentary_entry_spanning_verses_is_kept_once_with_four_byte_sizes(tmp_path):
    long_entry = "<p>" + "Spurgeon on the psalm. " * 4000 + "</p><p>Second paragraph.</p>"  # > 65,535 bytes
    write_module(tmp_path, "ot", "c", [[long_entry, "Next psalm."]], [(0, 0), (0, 0), (0, 0), (0, 1)], wide=True)
    out = texts.sword_text(tmp_path, "zCom4")
    assert out.count("Spurgeon on the psalm.") == 4000
    assert out.endswith("Spurgeon on the psalm.\n\nSecond paragraph.\nNext psalm.\n")  # paragraphs apart


def test_module_is_found_through_its_conf(tmp_path):
    share = tmp_path / "usr/share/sword"
    write_module(share / "modules/comments/zcom/tdavid", "ot", "c", [["Psalm one."]], [(0, 0)], wide=True)
    (share / "mods.d").mkdir(parents=True)
    (share / "mods.d/tdavid.conf").write_text("[TDavid]\nDataPath=./modules/comments/zcom/tdavid/\nModDrv=zCom4\n"
                                              "About=a=b\n")
    folder, driver = texts.sword_conf(tmp_path, "tdavid")
    assert (folder, driver) == ((share / "modules/comments/zcom/tdavid").resolve(), "zCom4")
    assert texts.sword_text(folder, driver) == "Psalm one.\n"


def test_a_missing_module_is_an_error_not_an_empty_text(tmp_path):
    with pytest.raises(FileNotFoundError):
        texts.sword_conf(tmp_path, "tdavid")
