"""The `famserve` command: `serve` runs the HTTP server, `generate` streams one completion from the engine in this
process (no server), printing speed and state size to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from famserve.engine.cli_args import add_model_args, add_serving_args, set_threads
from famserve.engine.training.cli import add_eval_parser, add_train_parser


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from famserve.engine.build import chosen_fam_adapter, load_model, requested_fam
    from famserve.engine.config import EngineConfig
    from famserve.engine.errors import FamserveError
    from famserve.engine.runner import ModelRunner
    from famserve.engine.sampling import Sampler, SamplingParams, SamplingState
    from famserve.engine.structured import GrammarCompiler, OutputFormat
    from famserve.engine.tokenizer import IncrementalDetokenizer

    set_threads(args.threads)
    try:
        fam, unset = requested_fam(args.block_size, args.memory_blocks, args.sink_tokens, args.fam_after_window,
                                   fam_length=args.fam_length)
        engine = EngineConfig(device=args.device, dtype=args.dtype, quantize=args.quantize)  # "auto" resolved
        adapter = chosen_fam_adapter(args.fam_adapter, args.model, args.mode)
        loaded = load_model(args.model, fam, args.mode, engine, adapter, unset)
        text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
        tok = loaded.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": text}]) if args.chat else tok.encode(text)
        output_format = None
        if args.json_schema:
            output_format = OutputFormat("json", Path(args.json_schema).read_text(), "--json-schema")
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, output_format=output_format)
        matcher = GrammarCompiler(tok, loaded.model.config.vocab_size).matcher(output_format) if output_format \
            else None
    except (FamserveError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = loaded.model
    int4 = ", int4 decode" if engine.quantize == "int4" else ""
    print(f"[famserve] {loaded.model_id}, mode {model.fam_config.describe()}, {engine.device} {engine.dtype}{int4}, "
          f"{torch.get_num_threads()} CPU threads", file=sys.stderr)
    runner, sampler = ModelRunner(model), Sampler(model.config.vocab_size)
    sampling = SamplingState(params, model.config.vocab_size, prompt, device=model.device, matcher=matcher)
    state = model.new_state()
    t0 = time.perf_counter()
    logits = runner.prefill(state, [prompt[i:i + 4096] for i in range(0, len(prompt), 4096)])
    t_prefill = time.perf_counter() - t0
    detok = IncrementalDetokenizer(tok)
    eos = set(model.config.eos_token_ids) | set(tok.eos_token_ids)
    n, t1 = 0, time.perf_counter()
    with torch.no_grad():
        while n < params.max_tokens:
            token = sampler.sample(logits, [sampling]).token_ids[0]
            sampling.observe(token)
            n += 1
            if token in eos:
                break
            sys.stdout.write(detok.push(token))
            sys.stdout.flush()
            if matcher is not None and matcher.done:  # the format is complete
                break
            logits = runner.decode([state], [token])
    sys.stdout.write(detok.flush() + "\n")
    t_decode = time.perf_counter() - t1
    print(f"[famserve] prompt {len(prompt)} tokens in {t_prefill:.2f}s "
          f"({len(prompt) / max(t_prefill, 1e-9):.1f} tok/s); "
          f"generated {n} tokens in {t_decode:.2f}s ({n / max(t_decode, 1e-9):.1f} tok/s); "
          f"state {state.nbytes / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from famserve.server.main import serve

    return serve(args.serve_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="famserve", description="TransformerFAM long-context inference server")
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream one completion from a model, no server")
    add_model_args(gen, shape_from_adapter=True)
    gen.add_argument("--mode", choices=["fam", "bswa", "full"], default=None,
                     help="attention mode (default: fam with a trained adapter, else bswa)")
    add_serving_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json-schema", metavar="FILE", help="hold the output to this JSON schema (structured output)")
    gen.set_defaults(func=cmd_generate)
    # serve's flags (and --help) are famserve.server.settings': main() hands them over unparsed, in order.
    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (see `famserve serve --help`)",
                         add_help=False)
    srv.set_defaults(func=cmd_serve)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        args.serve_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
