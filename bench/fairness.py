"""Fairness of the engine's scheduler: a short chat's time to first token (TTFT) on an idle engine and while a long
ingest (a prefill-only session append) runs, and the ingest's speed alone and with chats beside it. A benchmark, not
a test: it prints a table and writes a JSON file.

    python bench/fairness.py --ingest-tokens 16384 --chats 6 --threads 1

One process, LLMEngine driven directly (no HTTP). Chats (random --chat-prompt-tokens ids, --chat-tokens greedy
tokens) are submitted one at a time, every --chat-every-steps engine steps; TTFT counts from a chat's submission to
its first token. The ingest runs with the engine's own prefill budget (docs/server.md "Scheduling and fairness")."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from common import machine_info, print_table, write_json
from famserve.engine.build import DTYPES
from famserve.engine.config import EngineConfig, default_prefill_tokens
from famserve.engine.engine import GenerationRequest, LLMEngine, RequestOutput
from famserve.engine.sampling import SamplingParams
from throughput import RANDOM_SHAPES, build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path or alias (ignored with --random-shape)")
    p.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None)
    p.add_argument("--mode", choices=["fam", "bswa", "full"], default="bswa")
    p.add_argument("--ingest-tokens", type=int, default=16384)
    p.add_argument("--chats", type=int, default=6, help="chats submitted while the ingest runs (and when idle)")
    p.add_argument("--chat-prompt-tokens", type=int, default=32)
    p.add_argument("--chat-tokens", type=int, default=8)
    p.add_argument("--chat-every-steps", type=int, default=4)
    p.add_argument("--prefill-budget-tokens", type=int, default=None, help="default: the engine's for the device")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/fairness.json")
    return p.parse_args(argv)


def run(engine: LLMEngine, model, args: argparse.Namespace, with_ingest: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    ingest_done: list[float] = []
    first_token: dict[str, float] = {}
    submitted: dict[str, float] = {}

    def on_chat(out: RequestOutput) -> None:
        if out.token_ids and out.request_id not in first_token:
            first_token[out.request_id] = time.perf_counter()

    started = time.perf_counter()
    if with_ingest:
        ids = torch.randint(0, vocab, (args.ingest_tokens,), generator=gen).tolist()
        engine.add(GenerationRequest("ingest", ids, SamplingParams(max_tokens=1), state=model.new_state(),
                                     prefill_only=True),
                   lambda out: ingest_done.append(time.perf_counter()) if out.finished else None)

    def may_submit() -> bool:  # beside an ingest, chats start only while it runs (fewer if it ends first)
        return len(submitted) < args.chats and (not with_ingest or not ingest_done)

    steps = 0
    while (with_ingest and not ingest_done) or may_submit() or engine.has_work():
        if steps % args.chat_every_steps == 0 and may_submit():
            rid = f"chat{len(submitted)}"
            prompt = torch.randint(0, vocab, (args.chat_prompt_tokens,), generator=gen).tolist()
            submitted[rid] = time.perf_counter()
            engine.add(GenerationRequest(rid, prompt, SamplingParams(max_tokens=args.chat_tokens, temperature=0,
                                                                     ignore_eos=True)), on_chat)
        engine.step()
        steps += 1
    ttft = [first_token[r] - submitted[r] for r in submitted]
    result = {"with_ingest": with_ingest, "chats": len(ttft), "ttft_s": ttft, "steps": steps,
              "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_max_s": max(ttft, default=None)}
    if with_ingest:
        result["ingest_s"] = ingest_done[0] - started
        result["ingest_tok_s"] = args.ingest_tokens / result["ingest_s"]
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.prefill_budget_tokens = args.prefill_budget_tokens or default_prefill_tokens(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = build_model(argparse.Namespace(**vars(args), prompt_tokens=args.ingest_tokens,
                                                 decode_tokens=args.chat_tokens, quantize="none"))  # full's context
    engine = LLMEngine.from_config(model, eos_token_ids=[], config=EngineConfig(
        device=args.device, dtype=args.dtype, prefill_chunk_tokens=args.prefill_budget_tokens))
    run(engine, model, argparse.Namespace(**{**vars(args), "chats": 1}), with_ingest=False)  # warm-up
    idle = run(engine, model, args, with_ingest=False)
    busy = run(engine, model, args, with_ingest=True)
    alone = run(engine, model, argparse.Namespace(**{**vars(args), "chats": 0}), with_ingest=True) \
        if args.chats else busy
    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.0f}"

    rows = [["idle engine", ms(idle["ttft_p50_s"]), ms(idle["ttft_max_s"]), "-", "-"],
            [f"during the ingest ({busy['chats']} chats)", ms(busy["ttft_p50_s"]), ms(busy["ttft_max_s"]),
             f"{busy['ingest_tok_s']:.0f}", f"{busy['ingest_tok_s'] / alone['ingest_tok_s']:.2f}"]]
    print_table(f"{name}: short chats beside a {args.ingest_tokens}-token ingest (prefill budget "
                f"{args.prefill_budget_tokens} tokens/step)",
                ["chats run on", "TTFT p50 ms", "TTFT max ms", "ingest tok/s", "ingest speed vs alone"], rows)
    write_json(args.out, {"benchmark": "fairness", "machine": machine_info(args.device), "args": vars(args),
                          "idle": idle, "during_ingest": busy, "ingest_alone": alone})


if __name__ == "__main__":
    main()
