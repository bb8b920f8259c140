"""Long public-domain texts for quality benchmarks and FAM training, offline from Debian packages (see
../shared/EVAL-DATA.md): the six Austen novels (r-cran-janeaustenr), Moby Dick (r-cran-tokenizers) and four more
novels (r-cran-tidytext), decoded with `rdata` and written as UTF-8 .txt files, one per book; with --long, also
documents of over a million tokens from SWORD modules (Spurgeon's Treasury of David, 2.9M tokens of running prose;
the King James Bible, 1.0M), into their own folder so that `--books all` and training globs keep to the novels.

    python bench/texts.py --out data/texts                          # needs apt-get download and `pip install rdata`
    python bench/texts.py --out data/texts --long data/long         # and the >1M-token documents
"""

from __future__ import annotations

import argparse
import html
import re
import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "r-cran-tidytext")
AUSTEN = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
TIDYTEXT_TITLES = {"The War of the Worlds": "warofworlds", "Twenty Thousand Leagues under the Sea": "twentythousand",
                   "Great Expectations": "greatexpectations"}  # Pride and Prejudice there duplicates janeaustenr's
# Output name -> (Debian package, SWORD module name: its mods.d/<name>.conf).
SWORD_MODULES = {"treasuryofdavid": ("sword-comm-tdavid", "tdavid"), "kjv": ("sword-text-kjv", "engKJV2006eb")}


def _load_lazy(prefix: Path) -> dict:
    """An R package's lazy-load database (Rdata.rdx index + Rdata.rdb zlib records) as Python objects."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_file(str(prefix) + ".rdx"))
    blob = Path(str(prefix) + ".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset):int(offset) + int(length)]
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
    return out


def _lines(values) -> str:
    return "\n".join("" if v is None or v != v else str(v) for v in values) + "\n"


def extract(root: Path, out: Path) -> list[Path]:
    """Write the books found under an unpacked package tree `root` into `out`; returns the files written."""
    import rdata

    lib = root / "usr/lib/R/site-library"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        austen = _load_lazy(lib / "janeaustenr/data/Rdata")
        for name in AUSTEN:
            written.append(out / f"{name}.txt")
            written[-1].write_text(_lines(austen[name]))
        moby = str(_load_lazy(lib / "tokenizers/data/Rdata")["mobydick"][0]).lstrip("\ufeff").replace("\r\n", "\n")
        match = re.search(r"\*\*\* ?START OF.*?\*\*\*\n(.*)\*\*\* ?END OF", moby, re.S)
        written.append(out / "mobydick.txt")
        written[-1].write_text(match.group(1) if match else moby)
        books = rdata.read_rda(str(lib / "tidytext/extdata/books.rda"))["books"]
        for title, name in TIDYTEXT_TITLES.items():
            written.append(out / f"{name}.txt")
            written[-1].write_text(_lines(books[books["title"] == title]["text"]))
    return written


# --- SWORD modules (the Bible-text packages): compressed zText/zCom modules, OSIS markup ------------------------


def sword_text(module_dir: Path, driver: str) -> str:
    """The text of a compressed SWORD module (CompressType=ZIP, ModDrv zText/zCom or their 4-byte-size variants
    zText4/zCom4), every entry once in canonical order, markup reduced to plain text.

    Per testament (ot, nt) three files share a prefix letter (b, c or v: book, chapter or verse blocks): *.?zs lists
    the blocks (start, compressed size, raw size: u32 each), *.?zz holds them as zlib streams, and *.?zv has one
    entry per verse slot (block u32, offset u32, size u16, or u32 in the *4 drivers) into the decompressed block.
    A commentary entry that spans several verses appears at each of them; it is kept once."""
    entry = "<III" if driver.endswith("4") else "<IIH"
    parts, seen = [], set()
    for testament in ("ot", "nt"):
        block_file = next(iter(sorted(module_dir.glob(f"{testament}.?zs"))), None)
        if block_file is None or block_file.stat().st_size == 0:
            continue
        letter = block_file.suffix[1]
        data = module_dir.joinpath(f"{testament}.{letter}zz").read_bytes()
        blocks = [zlib.decompress(data[start:start + size]) if size else b""
                  for start, size, _ in struct.iter_unpack("<III", block_file.read_bytes())]
        index = module_dir.joinpath(f"{testament}.{letter}zv").read_bytes()
        for block, offset, size in struct.iter_unpack(entry, index):
            if size == 0 or block >= len(blocks) or (testament, block, offset) in seen:
                continue
            seen.add((testament, block, offset))
            text = osis_to_text(blocks[block][offset:offset + size].decode("utf-8", "replace"))
            if text:
                parts.append(text)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", "\n".join(parts)) + "\n"


def osis_to_text(markup: str) -> str:
    """An entry's OSIS XML as plain text: footnotes dropped, titles and paragraphs on lines of their own."""
    text = re.sub(r"<note\b.*?</note>", "", markup, flags=re.S)
    text = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", text, flags=re.S)
    text = re.sub(r"<(?:lb|p|br|/p|div|/div)\b[^>]*/?>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()).strip()


def sword_conf(root: Path, module: str) -> tuple[Path, str]:
    """A module's data folder and driver, from <root>/usr/share/sword/mods.d/<module>.conf."""
    share = root / "usr/share/sword"
    conf = dict(line.split("=", 1) for line in (share / f"mods.d/{module}.conf").read_text().splitlines()
                if "=" in line and not line.startswith("["))
    return (share / conf["DataPath"]).resolve(), conf["ModDrv"]


def extract_long(root: Path, out: Path) -> list[Path]:
    """Write the SWORD_MODULES found under an unpacked package tree `root` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (_, module) in SWORD_MODULES.items():
        written.append(out / f"{name}.txt")
        written[-1].write_text(sword_text(*sword_conf(root, module)))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/texts", help="folder for the novels' .txt files")
    parser.add_argument("--long", metavar="DIR", default=None,
                        help="also write the >1M-token SWORD documents into DIR (e.g. data/long)")
    args = parser.parse_args()
    packages = [*PACKAGES, *([package for package, _ in SWORD_MODULES.values()] if args.long else [])]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=True, capture_output=True)
        for deb in tmp.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        written = extract(tmp / "root", Path(args.out))
        if args.long:
            written += extract_long(tmp / "root", Path(args.long))
        for path in written:
            print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
