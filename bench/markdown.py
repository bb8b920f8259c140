"""Markdown tables for docs/benchmarks.md from the benchmarks' JSON files, so the page shows exactly what a run
measured:

    python bench/markdown.py bench/results/engine_speed.json bench/results/quality.json          # print
    python bench/markdown.py --update docs/benchmarks.md bench/results/engine_speed.json bench/results/quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MIB = 2**20
LABELS = {"bswa": "famserve BSWA", "fam": "famserve FAM", "full": "famserve full", "hf": "HF transformers fp32",
          "llamacpp": "llama.cpp Q4_1"}


def _table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _rate(s: dict[str, float], runs: int) -> str:
    if runs == 1:
        return f"{s['median']:.1f} (1 run)"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def machine_line(payload: dict[str, Any]) -> str:
    m, a = payload["machine"], payload.get("args", {})
    return (f"{m['device_name']}, {m['cpu_count']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; torch "
            f"{m['torch_version']}, {m['torch_threads']} threads, {a.get('dtype')}; transformers "
            f"{m.get('transformers_version')}; {m['date_utc']}; commit {m.get('git_commit')}; wall "
            f"{m.get('wall_s', 0) / 60:.0f} min")


def engine_speed(payload: dict[str, Any]) -> str:
    results = payload["results"]
    done = [r for r in results if "skipped" not in r]
    contexts = sorted({r["context_tokens"] for r in results})
    systems = list(dict.fromkeys(r["system"] for r in results))
    cell = {(r["system"], r["context_tokens"]): r for r in done}
    out = [f"Machine: {machine_line(payload)}", ""]
    for what in ("prefill", "decode"):
        out += [f"**{what.capitalize()} tokens/s** (median (min-max) of the runs):", ""]
        rows = [[LABELS.get(s, s), *(_rate(cell[(s, c)][f"{what}_tok_s"], cell[(s, c)]["runs"]) if (s, c) in cell
                                     else "not run" for c in contexts)] for s in systems]
        out += [_table(["system", *map(_k, contexts)], rows), ""]
    out += ["**Memory**: attention state per stream / process RSS after the context, MiB (each system in its own "
            "process):", ""]
    rows = [[LABELS.get(s, s), *(f"{cell[(s, c)]['state_nbytes'] / MIB:.1f} / {cell[(s, c)]['rss_bytes'] / MIB:.0f}"
                                 if (s, c) in cell else "not run" for c in contexts)] for s in systems]
    out += [_table(["system", *map(_k, contexts)], rows), ""]
    peaks = payload.get("roofline_peaks")
    if peaks:
        flop, copy = peaks["matmul"]["best_flop_s"], peaks["copy"]["best_bytes_s"]
        out += [f"**Against the machine** (matmul peak {flop / 1e9:.0f} GFLOP/s, copy {copy / 1e9:.1f} GB/s read + "
                "write, both measured in this run): prefill useful FLOP/s as a share of the matmul peak / decode "
                "bytes moved per second as a share of the copy bandwidth:", ""]
        rows = [[LABELS.get(s, s), *(f"{cell[(s, c)]['prefill_flop_s'] / flop:.0%} / "
                                     f"{cell[(s, c)]['decode_bytes_s'] / copy:.0%}" if (s, c) in cell else "-"
                                     for c in contexts)] for s in systems]
        out += [_table(["system", *map(_k, contexts)], rows), ""]
    ratio_rows = payload.get("ratios") or []
    if ratio_rows:
        cols = [("prefill_vs_hf", "prefill / HF"), ("decode_vs_hf", "decode / HF"),
                ("prefill_vs_llamacpp", "prefill / llama.cpp"), ("decode_vs_llamacpp", "decode / llama.cpp"),
                ("prefill_time_vs_bswa", "FAM prefill time / BSWA")]
        out += ["**Ratios of medians** (famserve tokens/s over the peer's, same run):", ""]
        out += [_table(["famserve", "context", *(c[1] for c in cols)],
                       [[r["system"], _k(r["context_tokens"]), *(f"{r[k]:.2f}" if k in r else "-" for k, _ in cols)]
                        for r in ratio_rows if r["system"] in ("bswa", "fam", "full")]), ""]
    return "\n".join(out)


def targets(payload: dict[str, Any]) -> str:
    """The targets recomputed from the results with engine_speed.targets (the current definitions)."""
    import engine_speed

    rows = [[t["target"], "not measured" if t["value"] is None else f"{t['value']:.3f}",
             {None: "not measured", True: "met", False: "**missed**"}[t["met"]]]
            for t in engine_speed.targets(payload["results"])]
    return _table(["target", "value", "verdict"], rows)


def quality(payload: dict[str, Any]) -> str:
    out = [f"Machine: {machine_line(payload)}; window L={payload['window']['block_size']} "
           f"M={payload['window']['memory_blocks']} S={payload['window']['sink_tokens']}", ""]
    ppl = [r for r in payload.get("perplexity") or [] if "skipped" not in r]
    if ppl:
        limit = payload.get("args", {}).get("max_tokens")
        span = f"the first {limit:,} tokens of each book" if limit else "whole books"
        out += [f"**Perplexity / next-token accuracy** over {span}:", ""]
        texts = list(dict.fromkeys(r["text"] for r in ppl))
        labels = list(dict.fromkeys(r["label"] for r in ppl))
        cell = {(r["label"], r["text"]): r for r in ppl}
        scored = {r["text"]: r["num_tokens"] + 1 for r in ppl if r["label"] != "full"}
        out += [_table(["mode", *(f"{t} ({scored.get(t, payload['books'].get(t, 0)):,} tokens)" for t in texts)],
                       [[label, *(f"{cell[(label, t)]['perplexity']:.2f} / {cell[(label, t)]['accuracy']:.1%}"
                                  if (label, t) in cell else "-" for t in texts)] for label in labels]), ""]
    passkey = payload.get("passkey") or []
    if passkey:
        lengths = sorted({r["num_tokens"] for r in passkey})
        labels = list(dict.fromkeys(r["label"] for r in passkey))
        cell = {(r["label"], r["num_tokens"]): r for r in passkey}

        def text(label: str, n: int) -> str:
            r = cell.get((label, n))
            return "not run" if r is None or "skipped" in r else f"{r['correct']}/{r['trials']}"

        out += ["**PassKey retrieval**, correct / trials, by prompt length:", ""]
        out += [_table(["mode", *map(_k, lengths)], [[label, *(text(label, n) for n in lengths)] for label in labels]),
                ""]
    return "\n".join(out)


def sections(payload: dict[str, Any], source: str) -> dict[str, str]:
    """Generated blocks, named after the JSON file's stem: STEM (tables) and, for engine_speed files, STEM_targets."""
    note = f"<!-- generated by `python bench/markdown.py --update docs/benchmarks.md {source}` -->\n"
    stem = Path(source).stem
    if payload["benchmark"] == "engine_speed":
        return {stem: note + engine_speed(payload), f"{stem}_targets": note + targets(payload)}
    return {stem: note + quality(payload)}


def update(doc: Path, blocks: dict[str, str]) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` for every generated block."""
    text = doc.read_text()
    for name, body in blocks.items():
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{doc}: no {begin} ... {end} markers")
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + body.rstrip() + "\n" + end + rest.split(end, 1)[1]
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files written by bench/engine_speed.py or bench/quality.py")
    p.add_argument("--update", metavar="DOC", help="write the tables into DOC between <!-- bench:NAME --> markers "
                   "instead of printing them")
    args = p.parse_args(argv)
    blocks: dict[str, str] = {}
    for path in args.results:
        blocks.update(sections(json.loads(Path(path).read_text()), path))
    if args.update:
        update(Path(args.update), blocks)
        print(f"updated {args.update}: {', '.join(blocks)}")
    else:
        print("\n\n".join(blocks.values()))


if __name__ == "__main__":
    main()
