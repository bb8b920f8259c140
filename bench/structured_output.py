"""What structured output costs: decode tokens/s of LLMEngine (no HTTP) with every stream held to a format, against
the same streams generating free text, side by side in one run; plus the one-off costs (llguidance's view of the
vocabulary, compiling each format). A benchmark, not a test: it prints a table and writes a JSON file.

    python bench/structured_output.py --streams 1,8 --decode-tokens 64 --repeats 3 --threads 2

Each round runs, for every stream count n, n greedy requests of the same short chat prompt once per format, in an
order that rotates between rounds: free text (EOS ignored), a regular expression and a JSON schema, the two formats
chosen so that no output can complete them within --decode-tokens (every run generates exactly that many tokens per
stream). Decode tok/s is the tokens after each stream's first over the time from the first token to the last; the
ratio column is a format's tok/s over free text's in the same round (the median of the rounds)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import print_table, save_run, spread, start, stream_counts
from famserve.engine.build import load_model
from famserve.engine.config import EngineConfig
from famserve.engine.engine import GenerationRequest, LLMEngine
from famserve.engine.sampling import SamplingParams
from famserve.engine.structured import GrammarCompiler, OutputFormat, json_schema_format

# Neither can be finished within a few hundred tokens: runs with and without a format generate the same count.
FORMATS: dict[str, OutputFormat | None] = {
    "free text": None,
    "regex": OutputFormat("regex", r"[A-Za-z ,.]{2000}"),
    "json schema": json_schema_format({
        "type": "object", "required": ["items"], "additionalProperties": False,
        "properties": {"items": {"type": "array", "minItems": 500, "items": {
            "type": "object", "required": ["name", "age"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}}}}),
}
PROMPT = [{"role": "user", "content": "List the people in the story with their ages, as JSON."}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path or alias")
    p.add_argument("--streams", default="1,8", help="comma-separated numbers of concurrent streams")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per stream")
    p.add_argument("--repeats", type=int, default=3, help="rounds (the median is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default="bench/results/structured_output.json")
    args = p.parse_args(argv)
    args.streams = stream_counts(p, args.streams)
    return args


def run(engine: LLMEngine, prompt: list[int], streams: int, output_format: OutputFormat | None,
        decode_tokens: int) -> float:
    """Decode tokens/s of `streams` requests run together."""
    stamps: list[float] = []
    counts = {f"r{i}": 0 for i in range(streams)}

    def emit(out) -> None:
        if out.token_ids:
            stamps.append(time.perf_counter())
            counts[out.request_id] += len(out.token_ids)

    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True, output_format=output_format)
    for request_id in counts:
        engine.add(GenerationRequest(request_id, list(prompt), params), emit)
    while engine.has_work():
        engine.step()
    if any(count != decode_tokens for count in counts.values()):
        raise RuntimeError(f"a stream generated {sorted(set(counts.values()))} tokens, not {decode_tokens}")
    # The first `streams` stamps are each stream's first token, out of the (shared) prefill step.
    return (len(stamps) - streams) / (stamps[-1] - stamps[streams - 1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = start(args)
    started = time.perf_counter()
    loaded = load_model(args.model, engine=EngineConfig(device=args.device, dtype=args.dtype))
    eos = set(loaded.tokenizer.eos_token_ids) | set(loaded.model.config.eos_token_ids)
    grammar = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size)
    t0 = time.perf_counter()
    grammar.matcher(FORMATS["regex"])  # the first matcher builds llguidance's view of the vocabulary
    vocabulary_s = time.perf_counter() - t0
    compile_s = {}
    for name, fmt in FORMATS.items():
        if fmt is not None:
            t0 = time.perf_counter()
            grammar.matcher(fmt)
            compile_s[name] = time.perf_counter() - t0
    engine = LLMEngine(loaded.model, sorted(eos), max_running=max(args.streams), grammar=grammar)
    prompt = loaded.tokenizer.apply_chat_template(PROMPT)
    run(engine, prompt, max(args.streams), FORMATS["json schema"], 4)  # warm-up, untimed
    names = list(FORMATS)
    tok_s: dict[tuple[str, int], list[float]] = {(name, n): [] for name in names for n in args.streams}
    for round_index in range(args.repeats):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for n in args.streams:
            for name in order:
                tok_s[name, n].append(run(engine, prompt, n, FORMATS[name], args.decode_tokens))
                print(f"  round {round_index + 1} {name:>11} x{n}: {tok_s[name, n][-1]:.1f} tok/s", flush=True)
    results: list[dict[str, Any]] = []
    rows = []
    for n in args.streams:
        for name in names:
            ratios = [v / free for v, free in zip(tok_s[name, n], tok_s["free text", n])]
            results.append({"format": name, "streams": n, "decode_tok_s": spread(tok_s[name, n]),
                            "ratio_to_free_text": spread(ratios), "runs": tok_s[name, n]})
            s = spread(tok_s[name, n])
            rows.append([name, str(n), f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})",
                         f"{statistics.median(ratios):.3f}"])
    print_table(f"Decode with and without a format, {args.model}, {args.decode_tokens} tokens per stream, "
                f"median of {args.repeats}", ["format", "streams", "decode tok/s", "x free text"], rows)
    print(f"one-off: llguidance vocabulary {vocabulary_s:.2f} s; compile "
          + ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in compile_s.items()))
    save_run(args.out, "structured_output", machine, args, started, True, results=results,
             vocabulary_s=vocabulary_s, compile_s=compile_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
