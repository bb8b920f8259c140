"""Short English conversations for `famserve train --chat-data`, offline from the `chatterbot-corpus` package
(BSD-3-Clause; see ../shared/EVAL-DATA.md): its YAML dialogues turned into user/assistant turns, one conversation
per line of a JSONL file.

    python bench/chat_data.py --out data/chat          # needs `pip download` to reach the package index; pyyaml

The categories whose questions overlap `famserve eval chat`'s facts (trivia, science, history, literature) and the
long technical ones (coding, tech support) are left out, so that chat batches hold the model to its own chat
behaviour without teaching the answers the chat evaluation checks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "chatterbot-corpus==1.3.3"
LEFT_OUT = ("trivia", "science", "history", "literature", "coding", "tech_support")


def conversations(dialogues: list[list]) -> list[dict]:
    """Alternating utterances as user/assistant messages, starting with the user; a last unanswered one is dropped."""
    out = []
    for dialogue in dialogues:
        turns = [str(u).strip() for u in dialogue if u is not None and str(u).strip()]
        turns = turns[:len(turns) // 2 * 2]
        if turns:
            out.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                     for i, t in enumerate(turns)]})
    return out


def main() -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/chat", help="folder for chatterbot.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        rows, counts = [], {}
        with zipfile.ZipFile(wheel) as archive:
            for name in sorted(archive.namelist()):
                category = Path(name).stem
                if "/data/english/" not in name or not name.endswith(".yml") or category in LEFT_OUT:
                    continue
                found = conversations(yaml.safe_load(archive.read(name)).get("conversations") or [])
                rows += found
                counts[category] = len(found)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chatterbot.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {path}: {len(rows)} conversations ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
