"""Does the model still remember? Perplexity and next-token accuracy over whole public-domain novels, and PassKey
retrieval accuracy against prompt length, for full attention (inside the model's trained context), BSWA with and
without attention sinks, FAM with the default (untrained) FAM prompt and FAM with a trained adapter. A benchmark, not
a test: it prints tables, writes JSON and plots PNGs into docs/.

    python bench/texts.py --out data/texts            # once: the novels, from Debian packages
    python bench/quality.py --books warofworlds --passkey-lengths 1024,4096,16384 --threads 2
    python bench/quality.py --fam-adapter smollm2-fam.safetensors --device cuda --dtype bfloat16 \\
        --books all --passkey-lengths 1024,4096,16384,32768,131072 --passkey-trials 20

Everything runs through the streaming engine with the functions behind `famserve eval` (engine/training/evaluate.py):
perplexity() per book (one stream, chunk by chunk) and passkey(). Full attention holds at most --full-context tokens,
so it scores a book in consecutive segments of that many tokens, each from an empty state, and runs PassKey only up
to that length. Next-token accuracy is the share of positions whose argmax is the next token."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from common import print_table, save_run, start
from markdown import passkey_grid
from famserve.engine.adapter import FamAdapter
from famserve.engine.build import DTYPES, LoadedModel, load_model
from famserve.engine.config import QUANTIZATIONS, EngineConfig, FamConfig, default_prefill_tokens
from famserve.engine.model import FamModel
from famserve.engine.training import evaluate
from famserve.engine.training.data import iter_text_tokens

ROOT = Path(__file__).resolve().parent.parent
# label -> (engine mode, sinks on, adapter on)
MODES = {"full": ("full", False, False), "bswa": ("bswa", True, False), "bswa-nosink": ("bswa", False, False),
         "fam": ("fam", True, False), "fam-adapter": ("fam", True, True)}
PASSKEY_ANSWER_ROOM = 64  # full attention's slots past --full-context: a PassKey answer is decoded after the prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path or alias")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated, any of {', '.join(MODES)} (default: all; fam-adapter needs --fam-adapter)")
    p.add_argument("--fam-adapter", default=None, help="trained FAM adapter (safetensors) for the fam-adapter mode")
    p.add_argument("--texts-dir", default=None,
                   help="folder of .txt novels (default: data/texts, written by bench/texts.py)")
    p.add_argument("--books", default="warofworlds",
                   help="comma-separated book names (file stems) in --texts-dir, or 'all'")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of each book")
    p.add_argument("--passkey-lengths", default="1024,4096,16384", help="PassKey prompt lengths, tokens")
    p.add_argument("--passkey-trials", type=int, default=5, help="prompts (fresh keys) per length and mode")
    p.add_argument("--passkey-depth", type=float, default=0.0, help="where the key sits in the filler, 0..1")
    p.add_argument("--passkey-batch", type=int, default=4, help="PassKey prompts prefilled together")
    p.add_argument("--skip-perplexity", action="store_true")
    p.add_argument("--skip-passkey", action="store_true")
    p.add_argument("--block-size", type=int, default=None, help="L (default: the adapter's, else the engine's)")
    p.add_argument("--memory-blocks", type=int, default=None, help="M (default: the adapter's, else the engine's)")
    p.add_argument("--sink-tokens", type=int, default=None, help="S (default: the adapter's, else the engine's)")
    p.add_argument("--fam-length", type=int, default=FamConfig().fam_length, help="F of untrained FAM "
                   "(the adapter brings its own)")
    p.add_argument("--full-context", type=int, default=8192,
                   help="full attention's context: SmolLM2-135M's trained context (books are scored in segments of "
                        "this many tokens; PassKey up to this length)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per engine step (default: the engine's for the device, 512 on CPU, 8192 on CUDA)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="int4: decode weights rounded to 4 bits (bfloat16, CPU; the int4 kernel reads steps of at most "
                        "8 tokens, so give --chunk-tokens 8 to score through it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/quality.json"))
    p.add_argument("--plot-dir", default=str(ROOT / "docs"), help="where the PNGs go ('' for none)")
    p.add_argument("--plot-prefix", default="bench")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    if args.fam_adapter is None:
        if "fam-adapter" in args.modes and args.modes != list(MODES):
            p.error("--modes fam-adapter needs --fam-adapter FILE")
        args.modes = [m for m in args.modes if m != "fam-adapter"]
    try:
        args.passkey_lengths = [int(v) for v in args.passkey_lengths.split(",") if v.strip()]
    except ValueError:
        p.error("--passkey-lengths: give comma-separated integers")
    args.chunk_tokens = args.chunk_tokens or default_prefill_tokens(args.device)
    return args


def window_config(args: argparse.Namespace) -> tuple[int, int, int]:
    """L, M, S for every windowed mode: the flags, else the adapter's (so BSWA and FAM compare at its window),
    else the engine's defaults."""
    default = FamConfig()
    trained = FamAdapter.load(args.fam_adapter) if args.fam_adapter else None
    pick = lambda flag, field: flag if flag is not None else getattr(trained or default, field)
    return (pick(args.block_size, "block_size"), pick(args.memory_blocks, "memory_blocks"),
            pick(args.sink_tokens, "sink_tokens"))


def load(label: str, args: argparse.Namespace, full_context: int) -> LoadedModel:
    mode, sinks, with_adapter = MODES[label]
    block, memory, sink_tokens = window_config(args)
    fam = FamConfig(mode=mode, block_size=block, memory_blocks=memory, fam_length=args.fam_length,
                    sink_tokens=sink_tokens if sinks else 0, full_context_tokens=full_context)
    engine = EngineConfig(device=args.device, dtype=args.dtype, quantize=args.quantize)
    return load_model(args.model, fam, mode, engine, args.fam_adapter if with_adapter else None,
                      shape_from_adapter=("fam_after_window",))  # served with the rule it was trained with


# --- perplexity and next-token accuracy --------------------------------------------------------------------------


def score(model: FamModel, pieces: Iterable[Sequence[int]], chunk_tokens: int) -> dict[str, float]:
    """Summed NLL (nats), tokens predicted and argmax hits of one stream (evaluate.perplexity)."""
    r = evaluate.perplexity(model, pieces, chunk_tokens)
    return {"nll_sum": r.nll * r.num_tokens, "num_tokens": r.num_tokens, "num_correct": r.num_correct}


def book_tokens(path: Path, lm: LoadedModel) -> list[int]:
    return [t for piece in iter_text_tokens([path], lm.tokenizer) for t in piece]


def perplexity_rows(label: str, lm: LoadedModel, books: dict[str, list[int]], args: argparse.Namespace,
                    full_context: int) -> list[dict[str, Any]]:
    rows = []
    for name, ids in books.items():
        ids = ids[:args.max_tokens] if args.max_tokens else ids
        started = time.perf_counter()
        # Full attention: consecutive segments of its context, each from an empty state.
        segments = [ids[i:i + full_context] for i in range(0, len(ids), full_context)] if label == "full" else [ids]
        parts = [score(lm.model, [seg], args.chunk_tokens) for seg in segments if len(seg) > 1]
        nll, count, correct = (sum(p[k] for p in parts) for k in ("nll_sum", "num_tokens", "num_correct"))
        seconds = time.perf_counter() - started
        rows.append({"label": label, "mode": lm.model.fam_config.describe(), "text": name, "num_tokens": count,
                     "nll": nll / count, "perplexity": float(torch.tensor(nll / count).exp()),
                     "accuracy": correct / count, "seconds": seconds, "segments": len(parts)})
        print(f"  {label:>12} {name:>18}: {count} tokens, perplexity {rows[-1]['perplexity']:8.2f}, accuracy "
              f"{rows[-1]['accuracy']:.3f} ({count / seconds:.0f} tok/s)", flush=True)
    return rows


# --- PassKey -----------------------------------------------------------------------------------------------------


def passkey_rows(label: str, lm: LoadedModel, args: argparse.Namespace, full_context: int) -> list[dict[str, Any]]:
    lengths = [n for n in args.passkey_lengths if label != "full" or n <= full_context]
    rows = [{"label": label, "num_tokens": n, "skipped": f"longer than full attention's context ({full_context})"}
            for n in args.passkey_lengths if n not in lengths]
    try:
        results = evaluate.passkey(lm.model, lm.tokenizer, lengths, args.passkey_trials, args.seed, args.passkey_depth,
                                   None, args.passkey_batch, args.chunk_tokens)
    except ValueError as e:  # a length too short for the prompt's frame: say so, not a traceback
        raise SystemExit(f"--passkey-lengths: {e}") from None
    for r in results:
        rows.append({"label": label, **r.as_dict()})
        print(f"  {label:>12} passkey @ {r.num_tokens:>7}: {r.correct}/{r.trials} "
              f"({r.digit_accuracy:.0%} of key digits in place, {r.from_key:.0%} of written digits from the key)",
              flush=True)
    return rows


# --- main --------------------------------------------------------------------------------------------------------


def find_books(args: argparse.Namespace) -> list[Path]:
    folder = Path(args.texts_dir) if args.texts_dir else ROOT / "data/texts"
    available = sorted(folder.glob("*.txt"))
    if not available:
        raise SystemExit(f"{folder}: no .txt novels; run `python bench/texts.py --out {folder}` first")
    if args.books == "all":
        return available
    names = [b.strip() for b in args.books.split(",") if b.strip()]
    missing = [n for n in names if not (folder / f"{n}.txt").exists()]
    if missing:
        there = ", ".join(p.stem for p in available)
        raise SystemExit(f"--books: {', '.join(missing)} not in {folder} (there: {there})")
    return [folder / f"{n}.txt" for n in names]


def report(ppl: list[dict[str, Any]], passkey: list[dict[str, Any]]) -> None:
    if ppl:
        print_table("perplexity and next-token accuracy over whole books (one stream per book and mode)",
                    ["mode", "book", "tokens", "perplexity", "accuracy", "tok/s"],
                    [[r["label"], r["text"], str(r["num_tokens"]), f"{r['perplexity']:.2f}", f"{r['accuracy']:.3f}",
                      f"{r['num_tokens'] / r['seconds']:.0f}"] for r in ppl])
    if passkey:
        lengths, rows = passkey_grid(passkey, "-")
        print_table("PassKey retrieval: correct / trials", ["mode", *map(str, lengths)], rows)


NOTES = ["perplexity/accuracy: one engine stream per book and mode (evaluate.perplexity's loop); full attention in "
         "consecutive segments of its context, each from an empty state",
         "passkey: evaluate.passkey, paper D.1 prompt with grass/sky filler, greedy answer, right when the first "
         "number generated equals the key",
         "fam: the default untrained FAM prompt; fam-adapter: the adapter's FAM prompt and merged LoRA"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = start(args)
    books = [] if args.skip_perplexity else find_books(args)
    block, memory, sinks = window_config(args)
    print(f"{machine['device_name']}, {machine['torch_threads']} threads, {args.dtype}; modes {args.modes}; "
          f"L={block} M={memory} S={sinks}; books {[b.stem for b in books]}; PassKey {args.passkey_lengths} x "
          f"{args.passkey_trials}", flush=True)
    started = time.perf_counter()
    ppl_rows: list[dict[str, Any]] = []
    passkey_rows_all: list[dict[str, Any]] = []
    book_ids: dict[str, list[int]] = {}

    def save(final: bool) -> Path:
        return save_run(args.out, "quality", machine, args, started, final,
                        window={"block_size": block, "memory_blocks": memory, "sink_tokens": sinks},
                        books={name: len(ids) for name, ids in book_ids.items()}, notes=NOTES,
                        perplexity=ppl_rows, passkey=passkey_rows_all)

    for label in args.modes:
        lm = load(label, args, args.full_context + PASSKEY_ANSWER_ROOM)
        if label == "full" and lm.model.config.max_position_embeddings != args.full_context:
            print(f"note: --full-context {args.full_context} but the model was trained for "
                  f"{lm.model.config.max_position_embeddings} tokens", flush=True)
        print(f"{label}: {lm.model.fam_config.describe()}", flush=True)
        if books and not book_ids:
            book_ids = {b.stem: book_tokens(b, lm) for b in books}
        with torch.inference_mode():
            if book_ids:
                ppl_rows += perplexity_rows(label, lm, book_ids, args, args.full_context)
                save(final=False)
            if not args.skip_passkey:
                passkey_rows_all += passkey_rows(label, lm, args, args.full_context)
                save(final=False)  # a run cut short keeps what it measured
        del lm
    report(ppl_rows, passkey_rows_all)
    path = save(final=True)
    print(f"\nwrote {path}")
    if args.plot_dir:
        import json

        import plot
        for png in plot.quality(json.loads(path.read_text()), Path(args.plot_dir), args.plot_prefix):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
