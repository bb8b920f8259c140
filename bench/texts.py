"""Long public-domain texts for quality benchmarks and FAM training, offline from Debian packages (see
../shared/EVAL-DATA.md): the six Austen novels (r-cran-janeaustenr), Moby Dick (r-cran-tokenizers) and four more
novels (r-cran-tidytext), decoded with `rdata` and written as UTF-8 .txt files, one per book.

    python bench/texts.py --out data/texts        # needs apt-get download and `pip install rdata`
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "r-cran-tidytext")
AUSTEN = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
TIDYTEXT_TITLES = {"The War of the Worlds": "warofworlds", "Twenty Thousand Leagues under the Sea": "twentythousand",
                   "Great Expectations": "greatexpectations"}  # Pride and Prejudice there duplicates janeaustenr's


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/texts", help="folder for the .txt files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        for deb in tmp.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        for path in extract(tmp / "root", Path(args.out)):
            print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
