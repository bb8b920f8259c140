"""Aggregate decode throughput and inter-token latency of LLMEngine (no HTTP) against the number of concurrent
streams: how much continuous batching buys. A benchmark, not a test: it prints a table and writes a JSON file.

    python bench/throughput.py --streams 1,2,4,8,16,32 --decode-tokens 64 --threads 2
    python bench/throughput.py --random-shape llama-1b --device cuda --dtype bfloat16   # no checkpoint needed

For each stream count n: n greedy requests of --prompt-tokens random ids are submitted at once, prefilled together in
the first engine step, then decoded in lockstep for --decode-tokens tokens each (EOS ignored). Decode tok/s is every
token after the first over the time from the first token to the last; inter-token latency (ITL) is the time between
two tokens of one stream, pooled over all streams; the ratio column is tok/s over the tok/s of one stream."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from common import peak_rss_bytes, print_table, start, stream_counts, write_json
from famserve.engine.build import DTYPES, load_model
from famserve.engine.config import MODES, QUANTIZATIONS, EngineConfig, FamConfig, ModelConfig, RopeScaling
from famserve.engine.engine import GenerationRequest, LLMEngine, RequestOutput
from famserve.engine.model import FamModel
from famserve.engine.quant import quantize_int4
from famserve.engine.sampling import SamplingParams

MIB = 2**20
WARMUP_DECODE_TOKENS = 4

# Shapes for --random-shape: the architectures of SmolLM2-135M and Llama-3.2-1B, with random weights.
RANDOM_SHAPES = {
    "smollm2-135m": ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": ModelConfig(architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                            num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                            rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
                            max_position_embeddings=131072, tie_word_embeddings=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path or alias (ignored with --random-shape)")
    p.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                   help="build a random-weight model of this shape instead of loading a checkpoint")
    p.add_argument("--streams", default="1,2,4,8,16,32", help="comma-separated numbers of concurrent streams")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per stream")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of every stream, in tokens")
    p.add_argument("--mode", default="bswa", choices=MODES, help="attention mode (default L=1024, M=3)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per stream count (the median is reported)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="int4: decode steps of up to 8 streams read 4-bit weights (CPU, bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA: every decode step eager (the baseline)")
    p.add_argument("--out", default="bench/results/throughput.json")
    args = p.parse_args(argv)
    args.streams = stream_counts(p, args.streams)
    if args.decode_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        p.error("--decode-tokens must be >= 2, --prompt-tokens and --repeats >= 1")
    return args


def build_model(args: argparse.Namespace) -> tuple[FamModel, str]:
    """The model under test and a description of it."""
    fam = FamConfig(mode=args.mode, full_context_tokens=args.prompt_tokens + args.decode_tokens)
    int4 = ", int4 decode" if args.quantize == "int4" else ""
    if args.random_shape is None:
        engine = EngineConfig(device=args.device, dtype=args.dtype, quantize=args.quantize)
        loaded = load_model(args.model, fam, args.mode, engine)
        return loaded.model, loaded.model_id + int4
    torch.manual_seed(0)
    with torch.device(args.device):  # weights are created where they run (no multi-GB copy from the CPU)
        model = FamModel(RANDOM_SHAPES[args.random_shape], fam)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:  # embeddings and projections; norms keep their ones
                param.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    if int4:
        quantize_int4(model.model.layers, DTYPES[args.dtype])
    model.to_device(args.device, DTYPES[args.dtype])
    return model, f"random {args.random_shape}{int4}"


@dataclass
class Run:
    prefill_s: float  # submission to every stream's first token (one engine step)
    decode_s: float  # first token of every stream to the last token of any
    decode_tokens: int  # tokens generated after the first ones
    itl_s: list[float]  # inter-token latencies, all streams pooled


def run_once(model: FamModel, num_streams: int, args: argparse.Namespace, decode_tokens: int) -> Run:
    prompt_budget = num_streams * args.prompt_tokens  # every prompt in the first step: streams decode in lockstep
    engine = LLMEngine(model, eos_token_ids=[], max_running=num_streams, max_waiting=num_streams,
                       prefill_budget_tokens=max(prompt_budget, 512),
                       state_memory_bytes=num_streams * model.state_nbytes, cuda_graphs=not args.no_cuda_graphs)
    times: dict[str, list[float]] = {}
    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    for i in range(num_streams):
        ids = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,),
                            generator=torch.Generator().manual_seed(i)).tolist()
        stamps = times[f"s{i}"] = []

        def emit(out: RequestOutput, stamps: list[float] = stamps) -> None:
            if out.token_ids:
                stamps.append(time.perf_counter())

        engine.add(GenerationRequest(f"s{i}", ids, params), emit)
    started = time.perf_counter()
    while engine.has_work():
        engine.step()
    first = max(stamps[0] for stamps in times.values())
    last = max(stamps[-1] for stamps in times.values())
    itl = [b - a for stamps in times.values() for a, b in zip(stamps, stamps[1:])]
    assert all(len(stamps) == decode_tokens for stamps in times.values())
    return Run(first - started, last - first, num_streams * (decode_tokens - 1), itl)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(model: FamModel, num_streams: int, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for r in range(args.repeats):
        gc.collect()
        runs.append(run_once(model, num_streams, args, args.decode_tokens))
        print(f"  {num_streams:>3} streams, run {r + 1}/{args.repeats}: "
              f"{runs[-1].decode_tokens / runs[-1].decode_s:8.1f} tok/s", flush=True)
    itl = [x for run in runs for x in run.itl_s]
    return {
        "streams": num_streams,
        "decode_tok_s": statistics.median(run.decode_tokens / run.decode_s for run in runs),
        "decode_tok_s_runs": [run.decode_tokens / run.decode_s for run in runs],
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "prefill_s": statistics.median(run.prefill_s for run in runs),
        "states_bytes": num_streams * model.state_nbytes,
    }


def report(results: list[dict[str, Any]]) -> None:
    base = next((r["decode_tok_s"] for r in results if r["streams"] == 1), None)
    rows = []
    for r in results:
        ratio = f"{r['decode_tok_s'] / base:.2f}" if base else "-"
        rows.append([str(r["streams"]), f"{r['decode_tok_s']:.1f}", ratio, f"{r['decode_tok_s'] / r['streams']:.1f}",
                     f"{r['itl_p50_s'] * 1e3:.1f}", f"{r['itl_p99_s'] * 1e3:.1f}", f"{r['prefill_s']:.2f}",
                     f"{r['states_bytes'] / MIB:.0f}"])
    print_table("aggregate decode throughput vs concurrent streams (ratio: tok/s over 1 stream's)",
                ["streams", "decode tok/s", "vs 1 stream", "per stream tok/s", "ITL p50 ms", "ITL p99 ms",
                 "prefill s", "states MiB"], rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = start(args)
    t0 = time.perf_counter()
    model, description = build_model(args)
    print(f"{description} ({args.mode}, {args.dtype}) on {machine['device_name']}, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads; built in {time.perf_counter() - t0:.1f} s; streams {args.streams}, "
          f"{args.prompt_tokens} prompt + {args.decode_tokens} decode tokens each", flush=True)
    with torch.inference_mode():
        run_once(model, 1, args, WARMUP_DECODE_TOKENS)  # untimed: first-call costs (allocation, kernels)
        results = [measure(model, n, args) for n in args.streams]
    report(results)
    machine["peak_rss_bytes"] = peak_rss_bytes()
    if args.device.startswith("cuda"):
        machine["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(torch.device(args.device))
    path = write_json(args.out, {
        "benchmark": "throughput",
        "model": description,
        "machine": machine,
        "args": vars(args),
        "notes": ["every prompt is prefilled in the first engine step, then all streams decode in lockstep",
                  "decode_tok_s: tokens after each stream's first / (last token - last first token)",
                  "itl: seconds between consecutive tokens of one stream, pooled over streams and repeats",
                  "greedy, EOS ignored; random prompt ids; untrained FAM prompt in fam mode (speed only)"],
        "results": results,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
