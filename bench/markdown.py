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
LABELS = {"bswa": "famserve BSWA", "fam": "famserve FAM", "full": "famserve full", "hf": "HF transformers",
          "llamacpp": "llama.cpp Q4_1", "bswa-int4": "famserve BSWA, int4 decode",
          "fam-int4": "famserve FAM, int4 decode"}


def _table(columns: list[str], rows: list[list[str]]) -> str:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    lines = ["| " + " | ".join(columns) + " |", rule]
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
            f"{m.get('transformers_version')}; {m['date_utc']}; commit {m.get('git_commit')}"
            + (f"; wall {m['wall_s'] / 60:.0f} min" if "wall_s" in m else ""))


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
    cols = [("prefill_vs_hf", "prefill / HF"), ("decode_vs_hf", "decode / HF"),
            ("prefill_vs_llamacpp", "prefill / llama.cpp"), ("decode_vs_llamacpp", "decode / llama.cpp"),
            ("prefill_time_vs_bswa", "FAM prefill time / BSWA")]
    # A run of famserve alone has no peer to divide by: no ratio table rather than one of dashes.
    ratio_rows = [r for r in payload.get("ratios") or [] if any(k in r for k, _ in cols)]
    if ratio_rows:
        out += ["**Ratios of medians** (famserve tokens/s over the peer's, same run):", ""]
        out += [_table(["famserve", "context", *(c[1] for c in cols)],
                       [[r["system"], _k(r["context_tokens"]), *(f"{r[k]:.2f}" if k in r else "-" for k, _ in cols)]
                        for r in ratio_rows if r["system"] not in ("hf", "llamacpp")]), ""]
    return "\n".join(out)


def targets(payload: dict[str, Any]) -> str:
    """The targets recomputed from the results with engine_speed.targets (the current definitions)."""
    import engine_speed

    all_targets = engine_speed.targets(payload["results"])
    rows = [[t["target"], f"{t['value']:.3f}", "met" if t["met"] else "**missed**"]
            for t in all_targets if t["value"] is not None]
    unmeasured = [t["target"] for t in all_targets if t["value"] is None]
    out = _table(["target", "value", "verdict"], rows)
    if unmeasured:  # named, not hidden: another run (or none yet) has to answer them
        out += f"\n\nNot measured by this run (systems or contexts it left out): {'; '.join(unmeasured)}."
    return out


def quality(payload: dict[str, Any]) -> str:
    a = payload.get("args", {})
    int4 = f"; int4 decode weights, {a['chunk_tokens']} tokens a step" if a.get("quantize") == "int4" else ""
    out = [f"Machine: {machine_line(payload)}; window L={payload['window']['block_size']} "
           f"M={payload['window']['memory_blocks']} S={payload['window']['sink_tokens']}{int4}", ""]
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
        lengths, rows = passkey_grid(passkey, "not run")
        out += ["**PassKey retrieval**, correct / trials, by prompt length:", ""]
        out += [_table(["mode", *map(_k, lengths)], rows), ""]
    return "\n".join(out)


def _mode_row(payload: dict[str, Any], label: str) -> str:
    """A quality mode with the window it ran at: the same label runs at different windows in different files."""
    if label == "full":
        return f"full ({_k(payload['args']['full_context'])} context)"
    w = payload["window"]
    int4 = ", int4" if payload.get("args", {}).get("quantize") == "int4" else ""
    return f"{label} (L={w['block_size']} M={w['memory_blocks']}{int4})"


def _source(payload: dict[str, Any], path: str) -> str:
    m = payload["machine"]
    where = "GPU" if m.get("device") == "cuda" else "CPU"
    return f"{Path(path).stem} ({where}, {payload.get('args', {}).get('dtype')})"


def quality_summary(payloads: list[tuple[str, dict[str, Any]]]) -> str:
    """One PassKey grid and one whole-book perplexity table across several bench/quality.py files: every mode at
    every length any file measured. A PassKey cell comes from the file with the most trials there, a perplexity
    cell from the first file (in argument order) that scored the whole book; each row names its files."""
    passkey: dict[tuple[str, int], tuple[dict[str, Any], str]] = {}
    perplexity: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
    skipped: set[tuple[str, int]] = set()  # (row, length) a file skipped: beyond that mode's context
    contexts: dict[str, int] = {}  # full attention's context, past which it has no PassKey cell
    for path, payload in payloads:
        source = _source(payload, path)
        contexts[_mode_row(payload, "full")] = payload["args"]["full_context"]
        for r in payload.get("passkey") or []:
            key = (_mode_row(payload, r["label"]), r["num_tokens"])
            if "skipped" in r:
                skipped.add(key)
            elif key not in passkey or r["trials"] > passkey[key][0]["trials"]:
                passkey[key] = (r, source)
        if payload.get("args", {}).get("max_tokens"):
            continue  # a book's first tokens are not the book
        for r in payload.get("perplexity") or []:
            if "skipped" not in r:
                perplexity.setdefault((_mode_row(payload, r["label"]), r["text"]), (r, source))

    def grid(cells: dict, columns: list, text) -> list[list[str]]:
        rows = list(dict.fromkeys(row for row, _ in cells))
        return [[row, *(text(row, c) for c in columns),
                 "; ".join(dict.fromkeys(cells[(row, c)][1] for c in columns if (row, c) in cells))] for row in rows]

    def passkey_text(row: str, n: int) -> str:
        if (row, n) in passkey:
            r = passkey[row, n][0]
            return f"{r['correct']}/{r['trials']}"
        beyond = row.startswith("full (") and n > contexts.get(row, n)
        return "beyond its context" if (row, n) in skipped or beyond else "not run"

    out = []
    if passkey:
        lengths = sorted({n for _, n in passkey})
        out += ["**PassKey retrieval**, correct / trials, by prompt length (the key at the start of the prompt):", "",
                _table(["mode", *map(_k, lengths), "from"], grid(passkey, lengths, passkey_text)), ""]
    if perplexity:
        books = list(dict.fromkeys(book for _, book in perplexity))
        tokens = {book: r["num_tokens"] + 1 for (row, book), (r, _) in perplexity.items() if not row.startswith("full")}
        out += ["**Perplexity / next-token accuracy** over whole books:", "",
                _table(["mode", *(f"{b} ({tokens[b]:,} tokens)" if b in tokens else b for b in books), "from"],
                       grid(perplexity, books, lambda row, b: f"{perplexity[row, b][0]['perplexity']:.2f} / "
                                                              f"{perplexity[row, b][0]['accuracy']:.1%}"
                            if (row, b) in perplexity else "not run")), ""]
    return "\n".join(out)


def server_concurrency(payload: dict[str, Any]) -> str:
    """bench/server_concurrency.py: the two servers side by side per number of concurrent streams."""
    results = payload["results"]
    runs = max((r["runs"] for r in results), default=0)
    systems = [s for s in ("famserve", "llamacpp") if any(r["system"] == s for r in results)]
    label = {"famserve": f"famserve ({payload.get('versions', {}).get('famserve_mode', 'bswa')})",
             "llamacpp": "llama.cpp server"}
    cell = {(r["system"], r["streams"]): r for r in results}
    streams = sorted({r["streams"] for r in results})
    ratio = {r["streams"]: r for r in payload.get("ratios") or []}
    a = payload.get("args", {})
    llamacpp = (payload.get("versions") or {}).get("llamacpp")
    if llamacpp:
        llamacpp = llamacpp.removeprefix("version:").split(" built with")[0].strip()
    out = [f"Machine: {machine_line(payload)}" + (f"; llama.cpp {llamacpp}" if llamacpp else ""),
           "", f"{a.get('prompt_tokens')} prompt + {a.get('max_tokens')} generated tokens per stream, "
           f"{a.get('threads')} thread per server, {runs} rounds per stream count; prompts: "
           f"{payload.get('prompt_source')}.", ""]

    def rate(r: dict[str, Any] | None, key: str = "decode_tok_s") -> str:
        if r is None or not r.get(key):
            return "not run"
        return _rate(r[key], r["runs"])

    def vs_one(system: str, n: int) -> str:
        one, r = cell.get((system, 1)), cell.get((system, n))
        if not one or not r or not one["decode_tok_s"] or not r["decode_tok_s"]:
            return "-"
        return f"{r['decode_tok_s']['median'] / one['decode_tok_s']['median']:.2f}x"

    def ratio_text(n: int) -> str:
        r = ratio.get(n)
        if not r:
            return "-"
        paired = r.get("decode_tok_s_paired")
        return f"{r['decode_tok_s']:.2f}" + (f" ({paired['min']:.2f}-{paired['max']:.2f})" if paired and runs > 1
                                             else "")

    out += ["**Aggregate decode tokens/s**, median (min-max) of the rounds. *decode*: every token after each "
            "stream's first, over the time from the first stream's first token to the last token (as the issue "
            "defines it; prefill of later streams falls inside that time); *steady*: the tokens that arrive once "
            "every stream has its first token, over that stretch (decode alone). *x1*: over the same server's "
            "1 stream. Last columns: famserve over llama.cpp (ratio of medians; decode: (min-max of the "
            "per-round ratios)):", ""]
    columns = ["streams"]
    for s in systems:
        columns += [f"{label[s]} decode", "x1", "steady"]
    if len(systems) == 2:
        columns += ["famserve / llama.cpp decode", "steady"]
    rows = []
    for n in streams:
        row = [str(n)]
        for s in systems:
            row += [rate(cell.get((s, n))), vs_one(s, n), rate(cell.get((s, n)), "steady_tok_s").split(" (")[0]]
        if len(systems) == 2:
            r = ratio.get(n)
            row += [ratio_text(n), "-" if not r or r.get("steady_tok_s") is None else f"{r['steady_tok_s']:.2f}"]
        rows.append(row)
    out += [_table(columns, rows), ""]

    def ms(r: dict[str, Any] | None, key: str) -> str:
        return "-" if r is None or r.get(key) is None else f"{r[key] * 1e3:.0f}"

    def pair(n: int, fn: Any) -> str:
        return " / ".join(fn(cell.get((s, n))) for s in systems)

    names = " / ".join(label[s] for s in systems)
    out += [f"**Latency**, {names}: inter-token latency (ITL, pooled over streams and rounds) and time to first "
            "token (TTFT: median over the rounds of the median stream; all N prompts arrive at once):", ""]
    out += [_table(["streams", "ITL p50, ms", "ITL p99, ms", "TTFT p50, s"],
                   [[str(n), pair(n, lambda r: ms(r, "itl_p50_s")), pair(n, lambda r: ms(r, "itl_p99_s")),
                     pair(n, lambda r: "-" if r is None else f"{r['ttft_p50_s']['median']:.2f}")]
                    for n in streams]), ""]
    return "\n".join(out)


def passkey_grid(passkey: list[dict[str, Any]], missing: str) -> tuple[list[int], list[list[str]]]:
    """bench/quality.py's PassKey rows as (prompt lengths, one row per mode: label, then correct/trials per length;
    `missing` where a cell was not run)."""
    lengths = sorted({r["num_tokens"] for r in passkey})
    cell = {(r["label"], r["num_tokens"]): r for r in passkey}

    def text(label: str, n: int) -> str:
        r = cell.get((label, n))
        return missing if r is None or "skipped" in r else f"{r['correct']}/{r['trials']}"

    labels = dict.fromkeys(r["label"] for r in passkey)
    return lengths, [[label, *(text(label, n) for n in lengths)] for label in labels]


def structured_output(payload: dict[str, Any]) -> str:
    a = payload["args"]
    rows = [[r["format"], str(r["streams"]), _rate(r["decode_tok_s"], len(r["runs"])),
             f"{r['ratio_to_free_text']['median']:.3f} ({r['ratio_to_free_text']['min']:.3f}-"
             f"{r['ratio_to_free_text']['max']:.3f})"] for r in payload["results"]]
    compile_ms = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in payload["compile_s"].items())
    return "\n".join([f"Machine: {machine_line(payload)}", "",
                      f"**Decode tokens/s**, {a['decode_tokens']} tokens per stream, greedy (median (min-max) of "
                      f"{a['repeats']} rounds; the ratio is to free text in the same round):", "",
                      _table(["format", "streams", "decode tok/s", "x free text"], rows), "",
                      f"One-off: llguidance's view of the vocabulary {payload['vocabulary_s']:.2f} s (first "
                      f"structured request of a process); compiling a format: {compile_ms}."])


def throughput(payload: dict[str, Any]) -> str:
    """bench/throughput.py: aggregate decode tokens/s and inter-token latency against concurrent streams."""
    a, results = payload["args"], payload["results"]
    one = results[0]["decode_tok_s"] if results and results[0]["streams"] == 1 else None
    rows = [[str(r["streams"]),
             f"{r['decode_tok_s']:.1f} ({min(r['decode_tok_s_runs']):.1f}-{max(r['decode_tok_s_runs']):.1f})",
             f"{r['decode_tok_s'] / one:.2f}" if one else "-", f"{1000 * r['itl_p50_s']:.0f}",
             f"{1000 * r['itl_p99_s']:.0f}", f"{r['states_bytes'] / MIB:.0f}"] for r in results]
    return "\n".join([f"Machine: {machine_line(payload)}; {payload['model']}, {a['mode']}", "",
                      f"**Decode tokens/s** of every stream together, {a['prompt_tokens']} prompt and "
                      f"{a['decode_tokens']} decode tokens per stream (median (min-max) of {a['repeats']} runs):", "",
                      _table(["streams", "decode tok/s", "x 1 stream", "ITL p50 ms", "ITL p99 ms", "states MiB"],
                             rows)])


def sections(payload: dict[str, Any], source: str) -> dict[str, str]:
    """Generated blocks, named after the JSON file's stem: STEM (tables) and, for engine_speed files, STEM_targets."""
    note = f"<!-- generated by `python bench/markdown.py --update docs/benchmarks.md {source}` -->\n"
    stem = Path(source).stem
    if payload["benchmark"] == "engine_speed":
        blocks = {stem: note + engine_speed(payload)}
        if len({r["context_tokens"] for r in payload["results"]}) > 1:  # the targets compare contexts
            blocks[f"{stem}_targets"] = note + targets(payload)
        return blocks
    if payload["benchmark"] == "server_concurrency":
        return {stem: note + server_concurrency(payload)}
    if payload["benchmark"] == "structured_output":
        return {stem: note + structured_output(payload)}
    if payload["benchmark"] == "throughput":
        return {stem: note + throughput(payload)}
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
    p.add_argument("results", nargs="+", help="JSON files written by bench/engine_speed.py, bench/quality.py, "
                   "bench/server_concurrency.py, bench/structured_output.py or bench/throughput.py")
    p.add_argument("--quality-summary", metavar="NAME", help="instead of each file's tables, one block NAME that "
                   "gathers every mode and length of the bench/quality.py files given")
    p.add_argument("--update", metavar="DOC", help="write the tables into DOC between <!-- bench:NAME --> markers "
                   "instead of printing them")
    args = p.parse_args(argv)
    blocks: dict[str, str] = {}
    if args.quality_summary:
        note = (f"<!-- generated by `python bench/markdown.py --quality-summary {args.quality_summary} --update "
                f"docs/benchmarks.md {' '.join(args.results)}` -->\n")
        blocks[args.quality_summary] = note + quality_summary([(p, json.loads(Path(p).read_text()))
                                                               for p in args.results])
    for path in [] if args.quality_summary else args.results:
        blocks.update(sections(json.loads(Path(path).read_text()), path))
    if args.update:
        update(Path(args.update), blocks)
        print(f"updated {args.update}: {', '.join(blocks)}")
    else:
        print("\n\n".join(blocks.values()))


if __name__ == "__main__":
    main()
