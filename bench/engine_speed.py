"""Prefill and decode speed and state size of the famserve engine (full / BSWA / FAM) side by side with HF
transformers' LlamaForCausalLM on the same weights, at a few context lengths, in one run. A benchmark, not a test:
it prints tables and writes a JSON file.

    python bench/engine_speed.py --contexts 2048,8192 --decode-tokens 32 --repeats 3 --threads 2

For each (system, context): prefill tokens/s over the whole prompt, decode tokens/s of greedy steps taken right after
that prompt, and the bytes of the attention state (famserve: FamState.nbytes; HF: its KV cache) after the prompt.
FAM runs with the default (untrained) FAM prompt: its speed is what matters here, not its output."""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common import machine_info, peak_rss_bytes, print_table, rss_bytes, spread, write_json
from famserve.engine.build import DTYPES, LoadedModel, load_model
from famserve.engine.config import EngineConfig, FamConfig
from famserve.engine.runner import ModelRunner
from famserve.engine.tokenizer import Tokenizer

FAMSERVE_MODES = ("full", "bswa", "fam")
WARMUP_TOKENS = 256  # prompt length of the one untimed warm-up run per loaded model
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path or alias")
    p.add_argument("--contexts", default="2048,8192", help="comma-separated prompt lengths, in tokens")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed after each prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (system, context)")
    p.add_argument("--modes", default="full,bswa,fam,hf", help="systems: any of full, bswa, fam, hf")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig().prefill_chunk_tokens,
                   help="famserve: most prompt tokens of one stream per forward pass (the engine's default)")
    p.add_argument("--out", default="bench/results/engine_speed.json")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in (*FAMSERVE_MODES, "hf"):
            p.error(f"--modes: unknown system {m!r} (choose from full, bswa, fam, hf)")
    if not args.contexts or min(args.contexts) < 1:
        p.error("--contexts: give positive token counts")
    if args.decode_tokens < 1 or args.repeats < 1:
        p.error("--decode-tokens and --repeats must be >= 1")
    return args


def text_ids(tokenizer: Tokenizer) -> list[int]:
    """Real text to feed: Python's own help topics (about 120k tokens), tokenized."""
    from pydoc_data.topics import topics
    return tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))


def prompt_ids(corpus: list[int], num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` of the corpus, repeated if it is shorter."""
    return torch.tensor((corpus * -(-num_tokens // len(corpus)))[:num_tokens], dtype=torch.int64)


# --- the systems under test: the same three calls for famserve and HF -------------------------------------------


class FamserveSystem:
    """One famserve attention mode on a loaded model."""

    def __init__(self, lm: LoadedModel, prefill_chunk: int):
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.runner = ModelRunner(lm.model, max_step_tokens=prefill_chunk)
        self.description = f"famserve {lm.model.fam_config.describe()}"

    def new_stream(self) -> Any:
        return self.lm.model.new_state()

    def prefill(self, state: Any, ids: torch.Tensor) -> torch.Tensor:
        return self.runner.prefill(state, [ids])

    def decode(self, state: Any, token: int) -> torch.Tensor:
        return self.runner.decode([state], [token])

    def state_nbytes(self, state: Any) -> int:
        return state.nbytes


class HFSystem:
    """transformers' LlamaForCausalLM (SDPA attention, DynamicCache) holding the famserve model's weights."""

    def __init__(self, lm: LoadedModel, device: str, dtype: torch.dtype):
        from transformers import LlamaConfig, LlamaForCausalLM
        c = lm.model.config
        if c.architecture != "llama" or c.rope_scaling is not None or c.attention_bias:
            raise SystemExit(f"the HF comparison builds a plain Llama; {c.architecture} with rope scaling "
                             f"{c.rope_scaling} / bias {c.attention_bias} is not supported here")
        cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                          num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                          rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                          tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
        self.tokenizer = lm.tokenizer
        self.model = LlamaForCausalLM(cfg)
        missing, unexpected = self.model.load_state_dict(lm.model.state_dict(), strict=False)
        if unexpected or set(missing) - ({"lm_head.weight"} if c.tie_word_embeddings else set()):
            raise SystemExit(f"HF model does not take the famserve weights: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = device
        # Only the last position's logits are needed (as famserve computes); all of them at 8k would be 1.6 GB.
        params = inspect.signature(self.model.forward).parameters
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {"num_logits_to_keep": 1}
        self.cache_name = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.description = f"HF transformers {__import__('transformers').__version__} LlamaForCausalLM (sdpa)"

    def new_stream(self) -> dict[str, Any]:
        return {"cache": None}

    def prefill(self, stream: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids[None].to(self.device), use_cache=True, **self.last_only)
        stream["cache"] = getattr(out, self.cache_name)
        return out.logits[:, -1]

    def decode(self, stream: dict[str, Any], token: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_name: stream["cache"]}, **self.last_only)
        stream["cache"] = getattr(out, self.cache_name)
        return out.logits[:, -1]

    def state_nbytes(self, stream: dict[str, Any]) -> int:
        cache = stream["cache"]
        layers = getattr(cache, "layers", None)
        if layers is not None:  # transformers >= 4.56
            tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
        else:
            tensors = [*cache.key_cache, *cache.value_cache]
        return sum(t.numel() * t.element_size() for t in tensors)


# --- measurement ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed stream: its prompt, then its decode steps."""

    prefill_s: float
    decode_s: float
    state_nbytes: int  # after the prompt
    rss_bytes: int  # process RSS after the prompt


def run_once(system: Any, ids: torch.Tensor, num_decode: int, sync: Callable[[], None]) -> Run:
    """A fresh stream: time the prompt, then `num_decode` greedy steps (argmax included)."""
    stream = system.new_stream()
    sync()
    t0 = time.perf_counter()
    logits = system.prefill(stream, ids)
    token = int(logits[-1].argmax())
    prefill_s = time.perf_counter() - t0
    state_nbytes, rss = system.state_nbytes(stream), rss_bytes()
    t0 = time.perf_counter()
    for _ in range(num_decode):
        token = int(system.decode(stream, token)[-1].argmax())
    sync()
    return Run(prefill_s, time.perf_counter() - t0, state_nbytes, rss)


def measure(system: Any, key: str, ids: torch.Tensor, args: argparse.Namespace,
            sync: Callable[[], None]) -> dict[str, Any]:
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(system, ids, args.decode_tokens, sync))
        gc.collect()
        print(f"  {key:>4} @ {ids.numel():>6}: run {i + 1}/{args.repeats}: prefill {runs[-1].prefill_s:7.2f} s, "
              f"decode {runs[-1].decode_s / args.decode_tokens * 1e3:7.1f} ms/token", flush=True)
    return {
        "system": key,
        "description": system.description,
        "context_tokens": ids.numel(),
        "decode_tokens": args.decode_tokens,
        "prefill_tok_s": spread([ids.numel() / r.prefill_s for r in runs]),
        "decode_tok_s": spread([args.decode_tokens / r.decode_s for r in runs]),
        "prefill_s": [r.prefill_s for r in runs],
        "decode_s": [r.decode_s for r in runs],
        "state_nbytes": runs[-1].state_nbytes,
        "rss_after_prefill_bytes": max(r.rss_bytes for r in runs),
    }


def load_system(key: str, context: int, args: argparse.Namespace) -> Any:
    engine = EngineConfig(device=args.device, dtype=args.dtype, prefill_chunk_tokens=args.prefill_chunk)
    if key == "hf":
        lm = load_model(args.model, FamConfig(mode="bswa"), "bswa", engine)
        system = HFSystem(lm, args.device, DTYPES[args.dtype])
        del lm
        return system
    # Full mode preallocates its context: exactly what this prompt and its decode steps need.
    fam = FamConfig(mode=key, full_context_tokens=context + args.decode_tokens)
    return FamserveSystem(load_model(args.model, fam, key, engine), args.prefill_chunk)


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    sync = (lambda: torch.cuda.synchronize(args.device)) if args.device.startswith("cuda") else (lambda: None)
    corpus: list[int] = []
    results = []
    for key in args.modes:
        system = None
        for context in args.contexts:
            if system is None or key == "full":  # full mode is sized per context; the others load once
                system = None
                gc.collect()
                t0 = time.perf_counter()
                system = load_system(key, context, args)
                print(f"{key}: loaded {system.description} in {time.perf_counter() - t0:.1f} s", flush=True)
                corpus = corpus or text_ids(system.tokenizer)
                with torch.inference_mode():
                    run_once(system, prompt_ids(corpus, min(WARMUP_TOKENS, context)), 2, sync)
            with torch.inference_mode():
                results.append(measure(system, key, prompt_ids(corpus, context), args, sync))
        del system
        gc.collect()
    return results


# --- report -----------------------------------------------------------------------------------------------------


def _rate(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per context and famserve mode: its median tokens/s over HF's, prefill and decode; for FAM also its prefill
    time over BSWA's (the cost of the FAM rows and updates)."""
    by = {(r["system"], r["context_tokens"]): r for r in results}
    out = []
    for context in sorted({r["context_tokens"] for r in results}):
        hf = by.get(("hf", context))
        for mode in FAMSERVE_MODES:
            mine = by.get((mode, context))
            if mine is None:
                continue
            row: dict[str, Any] = {"context_tokens": context, "system": mode}
            if hf:
                for what in ("prefill", "decode"):
                    row[f"{what}_vs_hf"] = mine[f"{what}_tok_s"]["median"] / hf[f"{what}_tok_s"]["median"]
            bswa = by.get(("bswa", context))
            if mode == "fam" and bswa:
                row["prefill_time_vs_bswa"] = bswa["prefill_tok_s"]["median"] / mine["prefill_tok_s"]["median"]
            out.append(row)
    return out


def report(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> None:
    print_table("prefill and decode, tokens/s: median [min-max] over repeats",
                ["system", "context", "prefill tok/s", "decode tok/s", "state MiB", "RSS MiB"],
                [[r["system"], str(r["context_tokens"]), _rate(r["prefill_tok_s"]), _rate(r["decode_tok_s"]),
                  f"{r['state_nbytes'] / MIB:.1f}", f"{r['rss_after_prefill_bytes'] / MIB:.0f}"] for r in results])
    if ratio_rows:
        columns = ["prefill_vs_hf", "decode_vs_hf", "prefill_time_vs_bswa"]
        print_table("ratios of medians: famserve tok/s / HF tok/s; FAM prefill time / BSWA prefill time",
                    ["system", "context", "prefill / HF", "decode / HF", "prefill time / BSWA"],
                    [[row["system"], str(row["context_tokens"]), *(f"{row[c]:.2f}" if c in row else "-"
                                                                  for c in columns)] for row in ratio_rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    print(f"{machine['device_name']}, torch {machine['torch_version']}, {machine['torch_threads']} threads, "
          f"{args.dtype}; contexts {args.contexts}, {args.decode_tokens} decode tokens, {args.repeats} repeats")
    results = benchmark(args)
    ratio_rows = ratios(results)
    report(results, ratio_rows)
    machine["peak_rss_bytes"] = peak_rss_bytes()
    path = write_json(args.out, {
        "benchmark": "engine_speed",
        "machine": machine,
        "args": {k: v for k, v in vars(args).items()},
        "notes": ["prefill: one fresh stream, the whole prompt, last-token logits + argmax; famserve in chunks of "
                  "--prefill-chunk tokens, HF in one forward (use_cache=True, logits_to_keep=1)",
                  "decode: greedy steps right after the prompt, argmax included",
                  "state_nbytes: famserve FamState.nbytes / HF DynamicCache keys+values, after the prompt",
                  "fam uses the default untrained FAM prompt: speed only"],
        "results": results,
        "ratios": ratio_rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
