"""The miniature PassKey reproduction of FAM-SPEC.md ("A miniature that works"; the paper's Fig. 3a in small): a
2-layer Llama-shape model (d=64, 4 heads, SwiGLU, RoPE) trained from scratch on token-level PassKey sequences of
96-160 tokens, FAM (L=16 M=1 F=4) versus BSWA (F=0, same L and M), key-digit accuracy at lengths far past the BSWA
receptive field (2 layers x 32 = 64 tokens). A benchmark, not a test: it prints a table, writes JSON and a PNG.

    python bench/passkey_miniature.py --fam-steps 3000 --bswa-steps 1500 --threads 1
    python bench/passkey_miniature.py --modes fam --rsp-prob 0.8 --seed 1 --out /tmp/x.json --plot /tmp/x.png

Accuracy is teacher-forced argmax on each of the 4 key digits (chance 10%), computed with the all-at-once model;
a sample at the longest length is re-run through the streaming engine (ModelRunner) to check it agrees."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from common import machine_info, print_table, write_json
from famserve.engine.runner import ModelRunner
from famserve.engine.training.miniature import Miniature, MiniatureConfig, evaluate, train_miniature
from famserve.engine.training.passkey import KEY_LENGTH, miniature_batch

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fam-steps", type=int, default=3000)
    p.add_argument("--bswa-steps", type=int, default=1500)
    p.add_argument("--modes", default="fam,bswa", help="which models to train, comma-separated")
    p.add_argument("--rsp-prob", type=float, default=0.0, help="Random State Passing (the spec's miniature: none)")
    p.add_argument("--lengths", default="128,256,512,1024", help="evaluation lengths, comma-separated")
    p.add_argument("--samples", type=int, default=256, help="evaluation sequences per length")
    p.add_argument("--progress-every", type=int, default=250, help="steps between progress lines (with a quick "
                   "accuracy probe at the first evaluation length)")
    p.add_argument("--engine-check-samples", type=int, default=16, help="longest-length samples re-run through "
                   "the streaming engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "passkey_miniature.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "passkey_miniature.png"))
    return p.parse_args(argv)


def run(cfg: MiniatureConfig, lengths: list[int], args: argparse.Namespace) -> tuple[Miniature, dict]:
    started, curve = time.perf_counter(), []

    def on_step(step: int, result, mini: Miniature) -> None:
        if step % args.progress_every == 0 or step == cfg.steps:
            probe = evaluate(mini, [lengths[0]], samples=64, seed=99)[lengths[0]]["digit_accuracy"]
            curve.append({"step": step, "loss": result.loss, "probe_accuracy": probe})
            print(f"[{cfg.mode}] step {step}/{cfg.steps} loss {result.loss:.3f} acc@{lengths[0]} {probe:.2f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    mini = train_miniature(cfg, on_step)
    train_s = time.perf_counter() - started
    results = evaluate(mini, lengths, samples=args.samples, seed=args.seed + 1000)
    return mini, {"mode": cfg.mode, "config": asdict(cfg), "train_seconds": train_s,
                  "seconds_per_step": train_s / max(1, cfg.steps), "curve": curve,
                  "accuracy": {str(k): v for k, v in results.items()}}


@torch.no_grad()
def engine_check(mini: Miniature, length: int, samples: int) -> float:
    """Digit accuracy of the streaming engine on `samples` sequences (the same model, FAM prompt installed)."""
    model = mini.model
    model.set_fam_prompt(None if mini.fam_prompt is None else mini.fam_prompt.detach())
    tokens, labels = miniature_batch(samples, length, torch.Generator().manual_seed(7))
    runner, right = ModelRunner(model), 0
    for row in range(samples):
        logits = runner.run([model.new_state()], [tokens[row]], all_logits=True)[0]  # (T, V)
        keep = labels[row] != -100
        right += int((logits[keep].argmax(-1) == labels[row][keep]).sum())
    return right / (samples * KEY_LENGTH)


def plot(path: Path, lengths: list[int], runs: list[dict], receptive_field: int) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        acc = [100 * r["accuracy"][str(n)]["digit_accuracy"] for n in lengths]
        ax.plot(lengths, acc, marker="o", label=f"{r['mode'].upper()} ({r['config']['steps']} steps)")
    ax.axhline(10, color="grey", linestyle=":", label="chance (10%)")
    ax.axvline(receptive_field, color="red", linestyle="--", label=f"BSWA receptive field ({receptive_field})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(0, 105)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("key-digit accuracy (%)")
    rsp = runs[0]["config"]["rsp_prob"]
    ax.set_title(f"Miniature PassKey: 2 layers, d=64, L=16 M=1 F=4, trained on 96-160 tokens"
                 f"{f', RSP {rsp}' if rsp else ''}", fontsize=10)
    ax.set_xlim(48, 1400)
    ax.legend(loc="lower left", bbox_to_anchor=(0.01, 0.16), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]
    base = MiniatureConfig(seed=args.seed, rsp_prob=args.rsp_prob)
    runs, minis = [], []
    steps_of = {"fam": args.fam_steps, "bswa": args.bswa_steps}
    for mode in args.modes.split(","):
        steps = steps_of[mode]
        mini, result = run(replace(base, mode=mode, steps=steps), lengths, args)
        if args.engine_check_samples:
            result["engine_check"] = {"length": lengths[-1], "samples": args.engine_check_samples,
                                      "digit_accuracy": engine_check(mini, lengths[-1], args.engine_check_samples)}
        runs.append(result)
        minis.append(mini)
    rows = [[f"{r['mode']} ({r['config']['steps']} steps, {r['seconds_per_step']:.2f} s/step)"]
            + [f"{100 * r['accuracy'][str(n)]['digit_accuracy']:.1f}%" for n in lengths] for r in runs]
    print_table(f"Miniature PassKey key-digit accuracy (chance 10%; BSWA receptive field {base.receptive_field} "
                "tokens)", ["model"] + [f"{n} tokens" for n in lengths], rows)
    for r in runs:
        if "engine_check" in r:
            c = r["engine_check"]
            print(f"{r['mode']}: streaming engine at {c['length']} tokens on {c['samples']} samples: "
                  f"{100 * c['digit_accuracy']:.1f}%")
    payload = {"benchmark": "passkey_miniature", "machine": machine_info("cpu"), "lengths": lengths,
               "receptive_field_bswa": base.receptive_field, "runs": runs}
    print(f"wrote {write_json(args.out, payload)}")
    if plot(Path(args.plot), lengths, runs, base.receptive_field):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
