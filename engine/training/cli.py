"""The `famserve train` and `famserve eval passkey|perplexity|chat` subcommands: argument parsers and the thin
functions that turn arguments into a TrainConfig or an evaluation, print a table and write JSON. server/cli.py
registers them with add_train_parser(sub) and add_eval_parser(sub)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from famserve.engine.cli_args import add_model_args, add_serving_args, set_threads

LORA_TARGETS_HELP = "comma-separated subset of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (default: all)"

log = logging.getLogger(__name__)


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# --- famserve train ----------------------------------------------------------------------------------------------

def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="fine-tune a model for FAM: FAM prompt + LoRA -> adapter file")
    add_model_args(p)
    p.add_argument("--data", nargs="*", default=[], metavar="FILE", help="text files (UTF-8)")
    p.add_argument("--passkey", action="store_true", help="train on PassKey prompts (filler from --data if given)")
    p.add_argument("--passkey-fraction", type=float, default=0.5, help="share of PassKey batches when both")
    p.add_argument("--passkey-start-step", type=int, default=0, metavar="N",
                   help="curriculum: text only for the first N steps, then PassKey mixed in (needs --data)")
    p.add_argument("--recall-fraction", type=float, default=0.0,
                   help="share of recall batches: a text span repeated past the attention window, loss on the repeat "
                        "only (a dense memory signal; needs --data)")
    p.add_argument("--chat-data", default=None, metavar="FILE",
                   help="JSONL of conversations, one {\"messages\": [...]} per line (bench/chat_data.py writes one)")
    p.add_argument("--chat-fraction", type=float, default=0.0,
                   help="share of chat batches: conversations in the model's chat template, loss on the assistant's "
                        "turns (with --distill-weight: the base model's own chat behaviour)")
    p.add_argument("--fresh-chat", action="store_true",
                   help="start chat batches from the FAM prompt's FAM_0, not the FAM carried by Random State Passing: "
                        "a new conversation is a new stream in serving, so its first tokens see FAM_0 and the sinks")
    p.add_argument("--passkey-beyond-window", type=int, default=0, metavar="N",
                   help="put every key 1..N blocks before the question's attention window, where only FAM can "
                        "carry it (default 0: the paper's layout, depth 0 half of the time)")
    p.add_argument("--passkey-answer-anywhere", action="store_true",
                   help="end each PassKey prompt at a random offset of its last block (unlabelled filler follows the "
                        "answer), so answers are written at every position of a block, as in serving (default: "
                        "every answer ends the sequence)")
    p.add_argument("--distill-weight", type=float, default=0.0, metavar="W",
                   help="minimise (1-W) x cross-entropy + W x KL to the base model reading the same sequence with "
                        "full attention (LoRA off): it sees what the window hides and keeps the base model's "
                        "behaviour (default 0: cross-entropy only)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", type=_csv, default=None, help=LORA_TARGETS_HELP)
    p.add_argument("--lora-scope", choices=["all", "fam"], default="all",
                   help="all: LoRA on every row, merged into the weights at load; fam: LoRA that only the FAM rows "
                        "use, so every token is computed with the base weights (BSWA's, plus the FAM keys it sees)")
    p.add_argument("--token-lora-targets", type=_csv, default=None, metavar="NAMES",
                   help="with --lora-scope fam: also LoRA on these projections of every row (merged at load), e.g. "
                        "q_proj, so tokens can learn to look up the FAM")
    p.add_argument("--rsp-prob", type=float, default=0.8, help="Random State Passing probability")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at the end)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from a <out stem>.train.pt")
    p.add_argument("--init-adapter", default=None, metavar="FILE",
                   help="start a new run from an adapter's FAM prompt and LoRA (a new phase: fresh optimizer, LR "
                        "schedule and data; L, M, S may differ, the LoRA shape and F may not)")
    p.add_argument("--no-grad-checkpoint", action="store_true", help="keep all activations (faster, more memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: autocast the forward pass (GPU; weights and optimizer stay float32)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: stop when spent, fitting the LR schedule to the steps that fit")
    p.add_argument("--out", default="fam-adapter.safetensors", help="the adapter file to write")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from famserve.engine.errors import FamserveError
    from famserve.engine.training.lora import ALL_TARGETS
    from famserve.engine.training.trainer import TrainConfig, train

    set_threads(args.threads)
    try:
        cfg = TrainConfig(model=args.model, out=args.out, data=tuple(args.data), passkey=args.passkey,
                          passkey_fraction=args.passkey_fraction, passkey_start_step=args.passkey_start_step,
                          passkey_beyond_window=args.passkey_beyond_window,
                          passkey_answer_anywhere=args.passkey_answer_anywhere, recall_fraction=args.recall_fraction,
                          chat_data=args.chat_data, chat_fraction=args.chat_fraction, fresh_chat=args.fresh_chat,
                          distill_weight=args.distill_weight,
                          steps=args.steps, seq_len=args.seq_len,
                          batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                          lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                          lora_targets=tuple(args.lora_targets or ALL_TARGETS), lora_scope=args.lora_scope,
                          token_lora_targets=tuple(args.token_lora_targets or ()),
                          fam_length=args.fam_length, block_size=args.block_size, memory_blocks=args.memory_blocks,
                          sink_tokens=args.sink_tokens, fam_after_window=args.fam_after_window,
                          rsp_prob=args.rsp_prob,
                          checkpoint_every=args.checkpoint_every, resume=args.resume,
                          init_adapter=args.init_adapter, seed=args.seed,
                          device=args.device, grad_checkpoint=not args.no_grad_checkpoint,
                          max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                          precision=args.precision)
        result = train(cfg, progress=sys.stderr.isatty())
    except (FamserveError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[famserve] {result.steps} steps, last loss {result.last_loss:.4f}, {result.seconds_per_step:.2f} s/step; "
          f"adapter {result.adapter_path}, checkpoint {result.checkpoint_path}", file=sys.stderr)
    return 0


# --- famserve eval -----------------------------------------------------------------------------------------------

def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="evaluate a model: passkey retrieval, perplexity, chat answers or "
                                             "recall past the window")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    pk = sub.add_parser("passkey", help="PassKey retrieval accuracy at several prompt lengths (paper D.1)")
    _add_eval_model_args(pk)
    pk.add_argument("--lengths", type=_csv_ints, default=[1024, 2048, 4096], help="prompt lengths in tokens")
    pk.add_argument("--trials", type=int, default=10, help="prompts per length")
    pk.add_argument("--depth", type=float, default=0.0, help="where the key sits in the filler, 0..1 (paper: 0)")
    pk.add_argument("--beyond-window", type=int, default=0, metavar="N",
                    help="put the key N blocks before the question's attention window instead (out of BSWA's "
                         "sight; training's --passkey-beyond-window layout)")
    pk.add_argument("--filler-file", default=None, help="text file for filler (default: grass/sky sentences)")
    pk.add_argument("--batch-size", type=int, default=4, help="prompts prefilled together")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--out", default="eval-passkey.json", help="JSON results file")
    pk.set_defaults(func=cmd_eval_passkey)

    ppl = sub.add_parser("perplexity", help="perplexity of long text files, streamed through the engine")
    _add_eval_model_args(ppl)
    ppl.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, read in order")
    ppl.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    ppl.add_argument("--out", default="eval-perplexity.json", help="JSON results file")
    ppl.set_defaults(func=cmd_eval_perplexity)

    chat = sub.add_parser("chat", help="a fixed set of chat prompts with checkable answers, answered greedily")
    _add_eval_model_args(chat)
    chat.add_argument("--sets", type=_csv, default=["short", "document", "recall"],
                      help="comma-separated: short (questions alone), document (asked after a long first message), "
                           "recall (a fact at the start of a long message, asked at its end)")
    chat.add_argument("--document-tokens", type=int, default=2500, help="length of the long message's text")
    chat.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
    chat.add_argument("--batch-size", type=int, default=8, help="prompts prefilled and decoded together")
    chat.add_argument("--out", default="eval-chat.json", help="JSON results file")
    chat.set_defaults(func=cmd_eval_chat)

    rc = sub.add_parser("recall", help="loss on a text span repeated past the attention window (memory, measured)")
    _add_eval_model_args(rc)
    rc.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files the spans come from")
    rc.add_argument("--lengths", type=_csv_ints, default=[5120], help="sequence lengths in tokens (at least "
                    "(M + 1) * L + L - S: the repeat's window must not reach the first copy)")
    rc.add_argument("--trials", type=int, default=8, help="sequences per length")
    rc.add_argument("--batch-size", type=int, default=4, help="sequences read together")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--out", default="eval-recall.json", help="JSON results file")
    rc.set_defaults(func=cmd_eval_recall)
    return ev


def _add_eval_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, shape_from_adapter=True)
    p.add_argument("--mode", type=_csv, default=[None],
                   help="comma-separated modes to compare: fam,bswa,full (default: fam with an adapter, else bswa)")
    add_serving_args(p)
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per engine step (default: the engine's for the device, 512 on CPU, 8192 on CUDA)")
    p.add_argument("--full-context-tokens", type=int, default=8192, help="full mode: preallocated context")


def _load(args: argparse.Namespace, mode: str):
    from famserve.engine.build import chosen_fam_adapter, load_model, requested_fam
    from famserve.engine.config import EngineConfig

    fam, unset = requested_fam(args.block_size, args.memory_blocks, args.sink_tokens, args.fam_after_window,
                               fam_length=args.fam_length, full_context_tokens=args.full_context_tokens)
    adapter = chosen_fam_adapter(args.fam_adapter, args.model, mode)
    engine = EngineConfig(device=args.device, dtype=args.dtype, quantize=args.quantize)
    return load_model(args.model, fam, mode, engine, adapter, unset)


Row = tuple[list[str], dict]  # one line of the printed table and the JSON record it comes from


def _run_eval(args: argparse.Namespace, title: str, columns: list[str], payload: dict,
              per_mode: Callable[[Any], Iterable[Row]]) -> int:
    """Load the model once per --mode, collect its rows into the table and into payload["results"], then print the
    table and write payload as JSON (exit 2 with a message, and no file, if loading or evaluating fails)."""
    from famserve.engine.errors import FamserveError

    from famserve.engine.config import default_prefill_tokens

    set_threads(args.threads)
    args.chunk_tokens = args.chunk_tokens or default_prefill_tokens(args.device)
    rows: list[list[str]] = []
    payload.update(model=args.model, adapter=args.fam_adapter, results=[])
    try:
        for mode in args.mode:
            for row, record in per_mode(_load(args, mode)):
                rows.append(row)
                payload["results"].append(record)
    except (FamserveError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_table(f"{title}, {args.model}", columns, rows)
    _write_json(args.out, payload)
    return 0


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from famserve.engine.training.evaluate import passkey

    def per_mode(loaded) -> Iterable[Row]:
        filler = loaded.tokenizer.encode(Path(args.filler_file).read_text()) if args.filler_file else None
        for r in passkey(loaded.model, loaded.tokenizer, args.lengths, args.trials, args.seed, args.depth,
                         filler, args.batch_size, args.chunk_tokens, args.beyond_window):
            yield ([r.mode, str(r.num_tokens), f"{r.correct}/{r.trials}", f"{r.accuracy:.0%}",
                    f"{r.digit_accuracy:.0%}", f"{r.from_key:.0%}" if r.digits_written else "-"], r.as_dict())

    return _run_eval(args, "PassKey retrieval", ["mode", "tokens", "correct", "accuracy", "digits", "from key"],
                     {"task": "passkey", "depth": args.depth, "beyond_window": args.beyond_window}, per_mode)


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from famserve.engine.training.data import iter_text_tokens
    from famserve.engine.training.evaluate import perplexity

    def per_mode(loaded) -> Iterable[Row]:
        r = perplexity(loaded.model, iter_text_tokens(args.text, loaded.tokenizer), args.chunk_tokens,
                       args.max_tokens)
        yield ([r.mode, str(r.num_tokens), f"{r.perplexity:.2f}", f"{r.accuracy:.1%}",
                f"{r.num_tokens / r.seconds:.0f}"],
               {"mode": r.mode, "num_tokens": r.num_tokens, "nll": r.nll, "perplexity": r.perplexity,
                "num_correct": r.num_correct, "accuracy": r.accuracy, "seconds": r.seconds})

    return _run_eval(args, "Perplexity", ["mode", "tokens", "perplexity", "accuracy", "tok/s"],
                     {"task": "perplexity", "text": args.text}, per_mode)


def cmd_eval_chat(args: argparse.Namespace) -> int:
    from famserve.engine.training.chat_eval import SETS, chat_eval, document_text

    unknown = [s for s in args.sets if s not in SETS]
    if unknown:
        print(f"error: --sets: {', '.join(unknown)} not one of {', '.join(SETS)}", file=sys.stderr)
        return 2
    payload = {"task": "chat", "document_tokens": args.document_tokens, "max_new_tokens": args.max_new_tokens,
               "document": None}

    def per_mode(loaded) -> Iterable[Row]:
        # the JSON holds the long document once; every prompt shows it as {DOCUMENT}
        document = payload["document"] = document_text(loaded.tokenizer, args.document_tokens)

        def shown(messages: list[dict]) -> list[dict]:
            return [{**m, "content": m["content"].replace(document, "{DOCUMENT}")} for m in messages]

        for r in chat_eval(loaded.model, loaded.tokenizer, args.sets, args.document_tokens, args.max_new_tokens,
                           args.batch_size, args.chunk_tokens):
            yield ([r.mode, r.set, f"{r.passed}/{r.total}", f"{r.passed / r.total:.0%}", f"{r.seconds:.0f}"],
                   {"mode": r.mode, "set": r.set, "passed": r.passed, "total": r.total, "seconds": r.seconds,
                    "answers": [{"id": a.case.id, "messages": shown(a.messages), "prompt_tokens": a.prompt_tokens,
                                 "answer_prefix": a.case.answer_prefix, "expect": list(a.case.expect),
                                 "max_words": a.case.max_words, "answer": a.answer,
                                 "passed": a.passed, "reason": a.reason} for a in r.answers]})

    return _run_eval(args, "Chat answers", ["mode", "set", "passed", "share", "seconds"], payload, per_mode)


def cmd_eval_recall(args: argparse.Namespace) -> int:
    from famserve.engine.training.data import iter_text_tokens
    from famserve.engine.training.evaluate import recall

    def per_mode(loaded) -> Iterable[Row]:
        ids = [t for piece in iter_text_tokens(args.text, loaded.tokenizer) for t in piece]
        for r in recall(loaded.model, ids, args.lengths, args.trials, args.seed, args.batch_size, args.chunk_tokens):
            yield ([r.mode, str(r.num_tokens), str(r.trials), f"{r.first_nll:.3f}", f"{r.control_nll:.3f}",
                    f"{r.repeat_nll:.3f}", f"{r.recalled:.1%}"],
                   {"mode": r.mode, "num_tokens": r.num_tokens, "trials": r.trials, "span": r.span,
                    "first_nll": r.first_nll, "control_nll": r.control_nll, "repeat_nll": r.repeat_nll,
                    "recalled": r.recalled})

    return _run_eval(args, "Recall past the window (NLL per token of the span)",
                     ["mode", "tokens", "trials", "first seen", "unseen (control)", "repeated", "recalled"],
                     {"task": "recall", "text": args.text}, per_mode)


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _write_json(path: str, payload: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[famserve] wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m famserve.engine.training.cli train|eval ...` (the same commands as `famserve train|eval`)."""
    parser = argparse.ArgumentParser(prog="famserve")
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
