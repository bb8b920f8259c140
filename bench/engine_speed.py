"""Speed and memory against context length, in one run on one machine: famserve (BSWA, FAM, optionally full
attention) side by side with HF transformers' LlamaForCausalLM on the same weights and llama.cpp (llama-cpp-python)
on the same GGUF file. A benchmark, not a test: it prints tables, writes JSON and plots PNGs into docs/.

    python bench/engine_speed.py --contexts 1024,8192,32768,131072,1048576 --repeats 3 --threads 2
    python bench/engine_speed.py --device cuda --dtype bfloat16 --systems bswa,fam,hf

Per (system, context): prefill tokens/s reaching that context from an empty stream, decode tokens/s of greedy steps
taken right after it, the attention state's bytes and the process's RSS. famserve BSWA/FAM read the context as one
stream in chunks (as a server reads an unbounded input) and are measured at every context on the way: the prefill
time to a context is the time the stream took to get there; the decode steps run on a copy of the state, so the
stream goes on unchanged. HF and llama.cpp prefill each context afresh. Each system runs in its own process (clean
RSS); the machine's matmul and copy limits are measured in the same run (bench/roofline.py). FAM runs with the
default (untrained) FAM prompt unless --fam-adapter is given: its speed is what matters here, not its output."""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import roofline
from common import peak_rss_bytes, print_table, rss_bytes, save_run, spread, start, write_json
from famserve.engine.build import DTYPES, LoadedModel, load_model
from famserve.engine.config import EngineConfig, FamConfig, default_prefill_tokens, int4_conflict
from famserve.engine.loader import resolve_model_path
from famserve.engine.quant import Int4DecodeLinear
from famserve.engine.runner import ModelRunner
from famserve.engine.tokenizer import Tokenizer

INT4 = "-int4"  # a famserve system with this suffix decodes from int4 weights (EngineConfig.quantize)
FAMSERVE_MODES = ("full", "bswa", "fam", "bswa" + INT4, "fam" + INT4)
STREAMING = ("bswa", "fam", "bswa" + INT4, "fam" + INT4)  # constant-size state: one stream read through every context
SYSTEMS = (*FAMSERVE_MODES, "hf", "llamacpp")
WARMUP_TOKENS = 256  # prompt length of the one untimed warm-up run per loaded model
# On a GPU 256 tokens left the first timed pass 3-4x slower (run G): warm up through the paths the timed runs take
# (several blocks a step, a CUDA graph capture and replays).
GPU_WARMUP_TOKENS, GPU_WARMUP_DECODE = 4096, 8
STREAM_CHUNK_TOKENS = 16384  # tokens handed to the runner per call while streaming a long context
MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint path or alias (a GGUF file for llamacpp)")
    p.add_argument("--contexts", default="1024,8192,32768,131072", help="comma-separated context lengths, tokens")
    p.add_argument("--systems", "--modes", dest="systems", default="bswa,fam,hf,llamacpp",
                   help=f"comma-separated, any of {', '.join(SYSTEMS)}")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed after each context")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (system, context)")
    p.add_argument("--repeat-max-context", type=int, default=131072,
                   help="contexts longer than this run once (a 1M-token stream takes minutes on a CPU)")
    p.add_argument("--hf-max-context", type=int, default=32768,
                   help="longest context for HF and famserve full (quadratic prefill, KV grows with context)")
    p.add_argument("--llamacpp-max-context", type=int, default=None,
                   help="longest context for llama.cpp (default: the context the model was trained for)")
    p.add_argument("--block-size", type=int, default=FamConfig().block_size, help="famserve L")
    p.add_argument("--memory-blocks", type=int, default=FamConfig().memory_blocks, help="famserve M")
    p.add_argument("--fam-length", type=int, default=FamConfig().fam_length, help="famserve F")
    p.add_argument("--sink-tokens", type=int, default=FamConfig().sink_tokens, help="famserve S")
    p.add_argument("--fam-adapter", default=None, help="trained FAM adapter for famserve fam (speed is the same)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's choice)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="famserve: most prompt tokens per engine step (default: the engine's for the device)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="famserve on CUDA: decode every token eagerly (the baseline of its CUDA-graph decode)")
    p.add_argument("--no-isolate", action="store_true", help="run every system in this process (RSS then mixes)")
    p.add_argument("--interleave", action="store_true",
                   help="run the repeats in rounds (every system once per round) so a shared machine's drifting "
                        "load hits all systems alike; one process per system and round")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one system for run_isolated: JSON only
    p.add_argument("--no-roofline", action="store_true", help="skip the matmul and copy measurements")
    p.add_argument("--out", default=str(ROOT / "bench/results/engine_speed.json"))
    p.add_argument("--plot-dir", default=str(ROOT / "docs"), help="where the PNGs go ('' for none)")
    p.add_argument("--plot-prefix", default="bench", help="PNG names: PREFIX_speed.png, PREFIX_memory.png")
    args = p.parse_args(argv)
    try:
        args.contexts = sorted({int(c) for c in args.contexts.split(",") if c.strip()})
    except ValueError:
        p.error("--contexts: give comma-separated integers")
    args.systems = [m.strip() for m in args.systems.split(",") if m.strip()]
    args.prefill_chunk = args.prefill_chunk or default_prefill_tokens(args.device)
    for m in args.systems:
        if m not in SYSTEMS:
            p.error(f"--systems: unknown system {m!r} (choose from {', '.join(SYSTEMS)})")
        if m.endswith(INT4) and int4_conflict(args.device, args.dtype):
            p.error(f"--systems {m}: int4 weights run on the CPU in bfloat16 (--dtype bfloat16)")
    if not args.contexts or args.contexts[0] < 1:
        p.error("--contexts: give positive token counts")
    if args.decode_tokens < 1 or args.repeats < 1:
        p.error("--decode-tokens and --repeats must be >= 1")
    if "llamacpp" in args.systems and args.device != "cpu":
        p.error("--systems llamacpp: the llama-cpp-python build measured here is CPU-only; leave it out on "
                f"{args.device}")
    return args


# --- input text -------------------------------------------------------------------------------------------------


def text_ids(tokenizer: Tokenizer) -> torch.Tensor:
    """Real text to feed: Python's own help topics (about 120k tokens), tokenized; longer contexts repeat it.
    Where an interpreter ships without pydoc_data, random token ids (speed does not depend on the text)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        logging.getLogger(__name__).warning("pydoc_data missing: feeding random token ids")
        return torch.randint(0, tokenizer.vocab_size, (1 << 17,), generator=torch.Generator().manual_seed(0))
    return torch.tensor(tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics))), dtype=torch.int64)


def corpus_slice(corpus: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Tokens start .. start+count of the corpus repeated end to end."""
    index = torch.arange(start, start + count) % corpus.numel()
    return corpus[index]


# --- the systems under test: the same calls for famserve, HF and llama.cpp -------------------------------------


class FamserveSystem:
    """One famserve attention mode on a loaded model."""

    def __init__(self, lm: LoadedModel, prefill_chunk: int, cuda_graphs: bool):
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.runner = ModelRunner(lm.model, max_step_tokens=prefill_chunk, cuda_graphs=cuda_graphs)
        graphs = {True: ", CUDA-graph decode", False: ", eager decode"}[self.runner.graphs is not None]
        int4 = [m for m in lm.model.modules() if isinstance(m, Int4DecodeLinear)]
        self.description = (f"famserve {lm.model.fam_config.describe()}"
                            f"{graphs if lm.model.device.type == 'cuda' else ''}{', int4 decode' if int4 else ''}")
        fam = lm.model.fam_config
        self.window = None if fam.mode == "full" else roofline.Window(fam.block_size, fam.memory_blocks,
                                                                      fam.num_fam_rows, fam.num_sinks)
        self.shape = roofline.Shape.of(lm.model.config)
        # a decode step reads the int4 copies of the quantized projections (with their scales), the rest densely
        dense_params = self.shape.matmul_params - sum(m.weight.numel() for m in int4)
        self.weight_bytes = dense_params * lm.model.dtype.itemsize + sum(m.int4.nbytes for m in int4)
        self.kv_element_bytes = lm.model.dtype.itemsize

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
        self.window, self.shape = None, roofline.Shape.of(c)
        self.weight_bytes = self.shape.matmul_params * dtype.itemsize
        self.kv_element_bytes = dtype.itemsize

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


class LlamaCppSystem:
    """llama.cpp through llama-cpp-python on the same GGUF file: its context (KV cache, f16) is allocated for
    `n_ctx` tokens up front; only the last position's logits are computed (logits_all=False)."""

    def __init__(self, gguf: Path, shape: roofline.Shape, n_ctx: int, threads: int, batch_tokens: int):
        import llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=batch_tokens, n_ubatch=batch_tokens,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_ctx = self.llm.n_ctx()
        self.description = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {gguf.name}, n_ctx {self.n_ctx})"
        self.window, self.shape = None, shape
        self.weight_bytes = gguf.stat().st_size  # the quantized weights, read once per token (roughly: + metadata)
        self.kv_element_bytes = 2  # llama.cpp's default KV cache type is f16

    def new_stream(self) -> dict[str, Any]:
        self.llm.reset()
        return {}

    def _last_logits(self) -> torch.Tensor:
        """(1, V) logits of the last token evaluated, copied out of llama.cpp's buffer."""
        import llama_cpp
        import numpy as np
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy())[None]

    def prefill(self, stream: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        self.llm.eval(ids.tolist())
        return self._last_logits()

    def decode(self, stream: dict[str, Any], token: int) -> torch.Tensor:
        self.llm.eval([token])
        return self._last_logits()

    def state_nbytes(self, stream: dict[str, Any]) -> int:
        """The KV cache llama.cpp allocates for its whole context (every layer, K and V, f16)."""
        return int(self.shape.kv_bytes(self.n_ctx, self.kv_element_bytes))


# --- measurement ------------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One stream measured at one context: the prompt, then its decode steps."""

    context_tokens: int
    prefill_s: float  # from an empty stream to this context
    decode_s: float  # all decode steps
    state_nbytes: int  # after the prompt
    rss_bytes: int  # process RSS after the prompt
    device_bytes: int | None = None  # CUDA: memory allocated by torch after the prompt


def device_allocated() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _greedy(logits: torch.Tensor) -> int:
    return int(logits[-1].argmax())


def fresh_point(system: Any, ids: torch.Tensor, num_decode: int, sync: Callable[[], None]) -> Point:
    """A fresh stream: time the whole prompt, then `num_decode` greedy steps (argmax included)."""
    stream = system.new_stream()
    sync()
    t0 = time.perf_counter()
    token = _greedy(system.prefill(stream, ids))
    prefill_s = time.perf_counter() - t0
    state_nbytes, rss, on_device = system.state_nbytes(stream), rss_bytes(), device_allocated()
    t0 = time.perf_counter()
    for _ in range(num_decode):
        token = _greedy(system.decode(stream, token))
    sync()
    return Point(ids.numel(), prefill_s, time.perf_counter() - t0, state_nbytes, rss, on_device)


def stream_points(system: FamserveSystem, corpus: torch.Tensor, contexts: list[int], num_decode: int,
                  sync: Callable[[], None], label: str) -> list[Point]:
    """One stream read through every context in order; at each, decode on a copy of the state (preallocated
    once, so the copies allocate nothing)."""
    state, scratch = system.new_stream(), system.new_stream()
    done, prefill_s, logits, points = 0, 0.0, None, []
    for context in contexts:
        while done < context:
            count = min(STREAM_CHUNK_TOKENS, context - done)
            ids = corpus_slice(corpus, done, count)
            sync()
            t0 = time.perf_counter()
            logits = system.prefill(state, ids)
            sync()
            prefill_s += time.perf_counter() - t0
            done += count
        scratch.copy_(state)
        token = _greedy(logits)
        sync()
        t0 = time.perf_counter()
        for _ in range(num_decode):
            token = _greedy(system.decode(scratch, token))
        sync()
        points.append(Point(context, prefill_s, time.perf_counter() - t0, system.state_nbytes(state), rss_bytes(),
                            device_allocated()))
        print(f"  {label:>8} @ {context:>8}: prefill {prefill_s:8.1f} s ({context / prefill_s:7.0f} tok/s), "
              f"decode {points[-1].decode_s / num_decode * 1e3:7.1f} ms/token, "
              f"RSS {points[-1].rss_bytes / MIB:6.0f} MiB",
              flush=True)
    return points


def max_context(key: str, args: argparse.Namespace, trained_context: int) -> int | None:
    """Longest context a system is run at (None: no limit)."""
    if key in ("hf", "full"):
        return args.hf_max_context
    if key == "llamacpp":
        return args.llamacpp_max_context or trained_context
    return None


def runs_at(context: int, args: argparse.Namespace) -> int:
    return args.repeats if context <= args.repeat_max_context else 1


def load_famserve(key: str, args: argparse.Namespace, context: int) -> LoadedModel:
    engine = EngineConfig(device=args.device, dtype=args.dtype, prefill_chunk_tokens=args.prefill_chunk,
                          quantize="int4" if key.endswith(INT4) else "none")
    mode = key.removesuffix(INT4)
    fam = FamConfig(mode="bswa" if key in ("hf", "llamacpp") else mode, block_size=args.block_size,
                    memory_blocks=args.memory_blocks, fam_length=args.fam_length, sink_tokens=args.sink_tokens,
                    full_context_tokens=context + args.decode_tokens)  # full: exactly what this context needs
    adapter = args.fam_adapter if mode == "fam" else None
    return load_model(args.model, fam, fam.mode, engine, adapter,
                      shape_from_adapter=("fam_after_window",))  # timed with the rule it is served with


def summarize(key: str, system: Any, points: list[Point], rss_after_load: int, num_decode: int) -> dict[str, Any]:
    context = points[0].context_tokens
    prefill_tok_s = [context / p.prefill_s for p in points]
    decode_tok_s = [num_decode / p.decode_s for p in points]
    prefill_s = context / spread(prefill_tok_s)["median"]
    decode_s = 1.0 / spread(decode_tok_s)["median"]
    flops = roofline.prefill_flops(system.shape, context, system.window)
    moved = roofline.decode_bytes(system.shape, context + num_decode // 2, system.window, system.weight_bytes,
                                  system.kv_element_bytes)
    return {
        "system": key,
        "description": system.description,
        "context_tokens": context,
        "runs": len(points),
        "decode_tokens": num_decode,
        "prefill_tok_s": spread(prefill_tok_s),
        "decode_tok_s": spread(decode_tok_s),
        "prefill_s": [p.prefill_s for p in points],
        "decode_s": [p.decode_s for p in points],
        "state_nbytes": points[-1].state_nbytes,
        "rss_after_load_bytes": rss_after_load,
        "rss_bytes": max(p.rss_bytes for p in points),
        "device_bytes": max((p.device_bytes for p in points if p.device_bytes is not None), default=None),
        "device_peak_bytes": torch.cuda.max_memory_allocated() if device_allocated() is not None else None,
        "prefill_flops": flops,
        "prefill_flop_s": flops / prefill_s,
        "decode_bytes_per_token": moved,
        "decode_bytes_s": moved / decode_s,
        # famserve on CUDA: graphs captured and replayed, and whether they were still on at the end (a capture
        # that disagrees with its eager warm-up switches them off, and the numbers above are then eager ones)
        "cuda_graphs": None if getattr(system, "runner", None) is None or system.runner.graphs is None else {
            "captures": system.runner.graphs.captures, "replays": system.runner.graphs.replays,
            "on": not system.runner.graphs.broken},
    }


def run_system(key: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every context of one system; skipped contexts come back as {"skipped": reason} rows."""
    sync = (lambda: torch.cuda.synchronize(args.device)) if args.device.startswith("cuda") else (lambda: None)
    on_gpu = args.device.startswith("cuda")
    warmup_tokens, warmup_decode = (GPU_WARMUP_TOKENS, GPU_WARMUP_DECODE) if on_gpu else (WARMUP_TOKENS, 2)
    lm = load_famserve(key, args, args.contexts[0])  # the tokenizer, shape and (for famserve/HF) weights
    corpus = text_ids(lm.tokenizer)
    shape = roofline.Shape.of(lm.model.config)
    limit = max_context(key, args, lm.model.config.max_position_embeddings)
    contexts = [c for c in args.contexts if limit is None or c <= limit]
    skipped = f"longer than this system's limit in this run ({limit} tokens)"
    results: list[dict[str, Any]] = [{"system": key, "context_tokens": c, "skipped": skipped}
                                     for c in args.contexts if c not in contexts]
    if not contexts:
        return results
    started = time.perf_counter()
    if key in STREAMING:
        system = FamserveSystem(lm, args.prefill_chunk, not args.no_cuda_graphs)
        del lm
        rss_after_load = rss_bytes()
        with torch.inference_mode():
            fresh_point(system, corpus[:warmup_tokens], warmup_decode, sync)
            by_context: dict[int, list[Point]] = {c: [] for c in contexts}
            for r in range(args.repeats):
                todo = [c for c in contexts if r < runs_at(c, args)]
                if not todo:
                    break
                for point in stream_points(system, corpus, todo, args.decode_tokens, sync, f"{key} {r + 1}"):
                    by_context[point.context_tokens].append(point)
                gc.collect()
        return results + [summarize(key, system, by_context[c], rss_after_load, args.decode_tokens) for c in contexts]
    hf = HFSystem(lm, args.device, DTYPES[args.dtype]) if key == "hf" else None
    lm = None  # HF holds its own copy of the weights; llama.cpp reads the GGUF file; full reloads per context
    gc.collect()
    system = None
    for context in contexts:
        if system is None or key in ("full", "llamacpp"):  # these allocate their context up front
            system = None
            gc.collect()
            if key == "hf":
                system = hf
            elif key == "llamacpp":
                system = LlamaCppSystem(resolve_model_path(args.model), shape, context + args.decode_tokens,
                                        args.threads or torch.get_num_threads(), args.prefill_chunk)
            else:
                system = FamserveSystem(load_famserve(key, args, context), args.prefill_chunk,
                                        not args.no_cuda_graphs)
            rss_after_load = rss_bytes()
            with torch.inference_mode():
                fresh_point(system, corpus[:min(warmup_tokens, context)], warmup_decode, sync)
        points = []
        with torch.inference_mode():
            for r in range(runs_at(context, args)):
                points.append(fresh_point(system, corpus_slice(corpus, 0, context), args.decode_tokens, sync))
                gc.collect()
                print(f"  {key + ' ' + str(r + 1):>8} @ {context:>8}: prefill {points[-1].prefill_s:8.1f} s, decode "
                      f"{points[-1].decode_s / args.decode_tokens * 1e3:7.1f} ms/token", flush=True)
        results.append(summarize(key, system, points, rss_after_load, args.decode_tokens))
    print(f"{key}: {system.description}, {time.perf_counter() - started:.0f} s", flush=True)
    return results


def run_isolated(key: str, args: argparse.Namespace, contexts: list[int] | None = None,
                 repeats: int | None = None) -> list[dict[str, Any]]:
    """run_system in a child process of this script, so each system's RSS is its own."""
    contexts = contexts or args.contexts
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{key}.json"
        argv = [sys.executable, __file__, "--systems", key, "--child",
                "--out", str(out), "--model", args.model, "--contexts", ",".join(map(str, contexts)),
                "--decode-tokens", str(args.decode_tokens), "--repeats", str(repeats or args.repeats),
                "--repeat-max-context", str(args.repeat_max_context), "--hf-max-context", str(args.hf_max_context),
                "--block-size", str(args.block_size), "--memory-blocks", str(args.memory_blocks),
                "--fam-length", str(args.fam_length), "--sink-tokens", str(args.sink_tokens),
                "--dtype", args.dtype, "--device", args.device, "--prefill-chunk", str(args.prefill_chunk)]
        for flag, value in (("--llamacpp-max-context", args.llamacpp_max_context), ("--threads", args.threads),
                            ("--fam-adapter", args.fam_adapter)):
            if value:
                argv += [flag, str(value)]
        argv += ["--no-cuda-graphs"] if args.no_cuda_graphs else []
        done = subprocess.run(argv, cwd=ROOT, check=False)
        if done.returncode != 0 or not out.exists():
            return [{"system": key, "context_tokens": c, "skipped": f"failed (exit {done.returncode})"}
                    for c in contexts]
        payload = json.loads(out.read_text())
        for r in payload["results"]:
            r.setdefault("peak_rss_bytes", payload["machine"]["peak_rss_bytes"])
        return payload["results"]


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (system, context) measured in several rounds (child processes) -> one summary over all their runs."""
    done = [r for r in rows if "skipped" not in r]
    if not done:
        return rows[0]
    merged = dict(done[0])
    context, num_decode = merged["context_tokens"], merged["decode_tokens"]
    merged["prefill_s"] = [t for r in done for t in r["prefill_s"]]
    merged["decode_s"] = [t for r in done for t in r["decode_s"]]
    merged["runs"] = len(merged["prefill_s"])
    merged["prefill_tok_s"] = spread([context / t for t in merged["prefill_s"]])
    merged["decode_tok_s"] = spread([num_decode / t for t in merged["decode_s"]])
    for name in ("rss_bytes", "rss_after_load_bytes", "peak_rss_bytes"):
        merged[name] = max(r.get(name) or 0 for r in done)
    merged["prefill_flop_s"] = merged["prefill_flops"] * merged["prefill_tok_s"]["median"] / context
    merged["decode_bytes_s"] = merged["decode_bytes_per_token"] * merged["decode_tok_s"]["median"]
    return merged


def run_interleaved(args: argparse.Namespace, on_round: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Round r runs every system once (r > 0: only contexts up to --repeat-max-context), so on a shared machine
    whose load drifts all systems see the same drift; rows are merged per (system, context)."""
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(args.repeats):
        contexts = args.contexts if r == 0 else [c for c in args.contexts if c <= args.repeat_max_context]
        if not contexts:
            break
        for key in args.systems:
            print(f"round {r + 1}/{args.repeats}: {key}", flush=True)
            for row in run_isolated(key, args, contexts, repeats=1):
                rows.setdefault((row["system"], row["context_tokens"]), []).append(row)
            on_round([merge_rounds(v) for v in rows.values()])
    return [merge_rounds(v) for v in rows.values()]


# --- report -----------------------------------------------------------------------------------------------------


def _rate(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]" if s["min"] != s["max"] else f"{s['median']:.1f}"


def _by(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["system"], r["context_tokens"]): r for r in results if "skipped" not in r}


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per context and famserve mode: median tok/s over HF's and over llama.cpp's (prefill and decode); for FAM also
    its prefill time over BSWA's (the cost of the FAM rows and updates)."""
    by, out = _by(results), []
    for context in sorted({r["context_tokens"] for r in results}):
        for mode in FAMSERVE_MODES:
            mine = by.get((mode, context))
            if mine is None:
                continue
            row: dict[str, Any] = {"context_tokens": context, "system": mode}
            for peer in ("hf", "llamacpp"):
                other = by.get((peer, context))
                for what in ("prefill", "decode"):
                    if other:
                        row[f"{what}_vs_{peer}"] = mine[f"{what}_tok_s"]["median"] / other[f"{what}_tok_s"]["median"]
            bswa = by.get(("bswa", context))
            if mode == "fam" and bswa:
                row["prefill_time_vs_bswa"] = bswa["prefill_tok_s"]["median"] / mine["prefill_tok_s"]["median"]
            out.append(row)
    return out


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the value measured (None: not measured in this run) and whether it is met."""
    by = _by(results)
    contexts = sorted({c for _, c in by})
    small = min(contexts, default=None)
    large = max((c for s, c in by if s in STREAMING), default=None)
    rows: list[dict[str, Any]] = []
    if small is None or large is None:
        return rows

    def add(name: str, value: float | None, ok: Callable[[float], bool], detail: str) -> None:
        rows.append({"target": name, "value": value, "met": None if value is None else bool(ok(value)),
                     "detail": detail})

    def get(system: str, context: int | None, field: str, stat: str = "median") -> float | None:
        r = by.get((system, context))
        if r is None:
            return None
        v = r[field]
        return v[stat] if isinstance(v, dict) else v

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    def across(value: float | None) -> float | None:  # a target across contexts needs two of them
        return value if large != small else None

    for mode in STREAMING:
        add(f"{mode}: decode tok/s at {large} >= 0.9x at {small}",
            across(ratio(get(mode, large, "decode_tok_s"), get(mode, small, "decode_tok_s"))), lambda v: v >= 0.9,
            "ratio of medians")
    full_window = min((c for c in contexts if c >= 8192), default=None)  # BSWA/FAM windows are full by 8k
    for mode in STREAMING if full_window not in (None, large) else ():  # not an issue target: separates "the
        # window filled up" from "the context grew"
        add(f"{mode}: decode tok/s at {large} / at {full_window} (window already full)",
            ratio(get(mode, large, "decode_tok_s"), get(mode, full_window, "decode_tok_s")), lambda v: v >= 0.9,
            "ratio of medians; informative")
    for mode in STREAMING:
        add(f"{mode}: decode tok/s at 8192 >= llama.cpp's at 8192",
            ratio(get(mode, 8192, "decode_tok_s"), get("llamacpp", 8192, "decode_tok_s")), lambda v: v >= 1.0,
            "ratio of medians, one stream")
    for mode in STREAMING:
        add(f"{mode}: prefill tok/s at 8192 >= 1.5x HF's", ratio(get(mode, 8192, "prefill_tok_s"),
                                                                get("hf", 8192, "prefill_tok_s")),
            lambda v: v >= 1.5, "ratio of medians")
    for context in contexts:
        add(f"FAM prefill time <= 1.05x BSWA's at {context}",
            ratio(get("bswa", context, "prefill_tok_s"), get("fam", context, "prefill_tok_s")), lambda v: v <= 1.05,
            "BSWA tok/s / FAM tok/s (medians)")
    for mode in STREAMING:
        add(f"{mode}: state bytes at {large} == at {small}",
            across(ratio(get(mode, large, "state_nbytes"), get(mode, small, "state_nbytes"))), lambda v: v == 1.0,
            "ratio")
    mid = max((c for c in contexts if c <= 131072 and c < (large or 0)), default=None)
    for mode in STREAMING:
        growth = ratio(get(mode, large, "rss_bytes"), get(mode, mid, "rss_bytes")) if mid is not None else None
        add(f"{mode}: RSS growth {mid} -> {large} < 5%", None if growth is None else growth - 1, lambda v: v < 0.05,
            "RSS at the longer context / at the shorter - 1")
    return rows


def report(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], target_rows: list[dict[str, Any]],
           peaks: dict[str, Any] | None) -> None:
    done = [r for r in results if "skipped" not in r]
    print_table("speed: tokens/s, median [min-max] over runs",
                ["system", "context", "runs", "prefill tok/s", "decode tok/s"],
                [[r["system"], str(r["context_tokens"]), str(r["runs"]), _rate(r["prefill_tok_s"]),
                  _rate(r["decode_tok_s"])] for r in done])
    on_device = any(r.get("device_bytes") is not None for r in done)
    print_table("memory: attention state and process RSS (each system in its own process)",
                ["system", "context", "state MiB", "RSS after load MiB", "RSS MiB", "peak RSS MiB",
                 *(["GPU allocated MiB", "GPU peak MiB"] if on_device else [])],
                [[r["system"], str(r["context_tokens"]), f"{r['state_nbytes'] / MIB:.1f}",
                  f"{r['rss_after_load_bytes'] / MIB:.0f}", f"{r['rss_bytes'] / MIB:.0f}",
                  f"{r['peak_rss_bytes'] / MIB:.0f}" if r.get("peak_rss_bytes") else "-",
                  *([f"{(r.get('device_bytes') or 0) / MIB:.0f}", f"{(r.get('device_peak_bytes') or 0) / MIB:.0f}"]
                    if on_device else [])] for r in done])
    if peaks:
        flop_peak, copy_peak = peaks["matmul"]["best_flop_s"], peaks["copy"]["best_bytes_s"]
        print_table(f"against the machine: matmul peak {flop_peak / 1e9:.0f} GFLOP/s, copy {copy_peak / 1e9:.1f} GB/s "
                    f"(read + write), measured in this run",
                    ["system", "context", "prefill GFLOP/s", "of peak", "decode GB/s", "of copy"],
                    [[r["system"], str(r["context_tokens"]), f"{r['prefill_flop_s'] / 1e9:.1f}",
                      f"{r['prefill_flop_s'] / flop_peak:.0%}", f"{r['decode_bytes_s'] / 1e9:.2f}",
                      f"{r['decode_bytes_s'] / copy_peak:.0%}"] for r in done])
    if ratio_rows:
        columns = ["prefill_vs_hf", "decode_vs_hf", "prefill_vs_llamacpp", "decode_vs_llamacpp",
                   "prefill_time_vs_bswa"]
        print_table("ratios of medians: famserve tok/s / peer tok/s; FAM prefill time / BSWA prefill time",
                    ["system", "context", "prefill/HF", "decode/HF", "prefill/llama.cpp", "decode/llama.cpp",
                     "FAM time/BSWA"],
                    [[row["system"], str(row["context_tokens"]), *(f"{row[c]:.2f}" if c in row else "-"
                                                                  for c in columns)] for row in ratio_rows])
    print_table("targets", ["target", "value", "met"],
                [[t["target"], "not measured" if t["value"] is None else f"{t['value']:.3f}",
                  {None: "-", True: "yes", False: "NO"}[t["met"]]] for t in target_rows])
    skipped = [r for r in results if "skipped" in r]
    for r in skipped:
        print(f"not run: {r['system']} at {r['context_tokens']}: {r['skipped']}")


NOTES = ["prefill: from an empty stream to the context, last-token logits + argmax; famserve bswa/fam read one "
         "stream through every context (chunks of --prefill-chunk tokens per forward); HF one forward "
         "(use_cache=True, logits_to_keep=1); llama.cpp Llama.eval (n_batch = --prefill-chunk)",
         "decode: greedy steps right after the context, argmax included (famserve: on a copy of the state)",
         "state_nbytes: famserve FamState.nbytes; HF DynamicCache keys+values; llama.cpp its f16 KV cache for n_ctx "
         "tokens (computed from the shape)",
         "roofline: useful FLOPs / bytes (bench/roofline.py) over the matmul / copy limits measured in this run",
         "fam uses the default untrained FAM prompt unless args.fam_adapter is set: speed only"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = start(args)
    if args.child:
        results = run_system(args.systems[0], args)
        machine["peak_rss_bytes"] = peak_rss_bytes()
        write_json(args.out, {"benchmark": "engine_speed", "machine": machine, "results": results})
        return
    print(f"{machine['device_name']}, torch {machine['torch_version']}, {machine['torch_threads']} threads, "
          f"{args.dtype}; contexts {args.contexts}; systems {args.systems}; {args.decode_tokens} decode tokens, "
          f"{args.repeats} runs up to {args.repeat_max_context} tokens", flush=True)
    started = time.perf_counter()
    peaks = None if args.no_roofline else roofline.measure_peaks(args.device, args.dtype)
    results: list[dict[str, Any]] = []

    def save(final: bool) -> Path:
        machine["peak_rss_bytes"] = peak_rss_bytes()
        return save_run(args.out, "engine_speed", machine, args, started, final, notes=NOTES, roofline_peaks=peaks,
                        results=results, ratios=ratios(results), targets=targets(results))

    if args.interleave and not args.no_isolate:
        def keep(rows: list[dict[str, Any]]) -> None:
            results[:] = rows
            save(final=False)  # a run cut short keeps what it measured
        results = run_interleaved(args, keep)
    for key in ([] if args.interleave and not args.no_isolate else args.systems):
        results += run_isolated(key, args) if not args.no_isolate else run_system(key, args)
        save(final=False)
        gc.collect()
    if peaks:  # once more at the end: the machine is shared, its load may have changed
        again = roofline.measure_peaks(args.device, args.dtype)
        peaks = {"start": peaks, "end": again,
                 "matmul": max(peaks["matmul"], again["matmul"], key=lambda m: m["best_flop_s"]),
                 "copy": max(peaks["copy"], again["copy"], key=lambda m: m["best_bytes_s"])}
    report(results, ratios(results), targets(results), peaks)
    path = save(final=True)
    print(f"\nwrote {path}")
    if args.plot_dir:
        import plot
        for png in plot.engine_speed(json.loads(path.read_text()), Path(args.plot_dir), args.plot_prefix):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
