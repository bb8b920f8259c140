"""Time one `famserve train` step (forward, loss, backward, AdamW) of a real model, this tree against an earlier
revision of the training code, interleaved so that a noisy shared machine skews both alike.

    python bench/train_step.py --threads 1 --baseline 69431ed
    python bench/train_step.py --configs 256,1,16,4,1024 --rounds 5 --variants current,unmerged
    python bench/train_step.py --device cuda --precision bfloat16 --configs 1024,3,64,4,6144 --batch-size 4 --profile

A config is L,M,F,S,T (block size, memory blocks, FAM rows, sinks, tokens per sequence). Variants:
`current` (this tree as `famserve train` runs it), `merged` / `unmerged` (this tree with LoRA's merged weight
forced on / off; by default it is on for GPUs and under autocast) and `baseline` (engine/training/sequence.py and
lora.py as of --baseline REV, read with `git show`). Every variant
trains its own copy of the model on the same batch (random tokens, every position labelled, like a text batch) from
the same LoRA initialisation; the first step's losses must agree, which checks that the variants compute the same
thing. Each round times one step of every variant per config (alternating their order), after one untimed warm-up
step each. On the CPU with one thread the measure is the process's CPU time: on a shared machine wall time also
counts the time other jobs held the core, CPU time much less so (wall times are recorded too). The speed-up is the
median over rounds of the ratio to the first variant's step in the same round. Prints a table, writes JSON.

--attention also times the token rows' block attention alone (one layer, forward and backward, random inputs of
the model's head shapes), baseline against current, --attention-rounds times each: the part of the step the new
kernels change, free of the matmuls that dominate the step on a CPU."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from common import print_table, spread, start, write_json
from famserve.engine.build import load_model
from famserve.engine.config import EngineConfig, FamConfig
from famserve.engine.training import lora as lora_module
from famserve.engine.training import sequence as sequence_module
from famserve.engine.training.sequence import default_fam_prompt

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default="64,1,8,4,384;256,1,16,4,1024",
                   help="semicolon-separated L,M,F,S,T (block size, memory blocks, FAM rows, sinks, tokens)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--variants", default="baseline,current",
                   help="comma-separated: baseline, current, merged, unmerged")
    p.add_argument("--baseline", default="69431ed", help="git revision of the baseline's training code")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant and config (0: none)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--no-grad-checkpoint", action="store_true", help="keep activations (as --no-grad-checkpoint)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: autocast the forward pass, as `famserve train --precision bfloat16`")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="also time the block attention alone (see above)")
    p.add_argument("--attention-rounds", type=int, default=9)
    p.add_argument("--profile", action="store_true", help="print the top operators of one step of each variant "
                   "at the first config (which kernels SDPA picked, where the time goes)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"))
    return p.parse_args(argv)


def module_at(rev: str, path: str, name: str) -> ModuleType:
    """The module `path` of this repository as of git revision `rev`, imported under `name`."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


class Variant:
    """One copy of the model with its own LoRA wrapping, FAM prompt and optimizer."""

    def __init__(self, name: str, base, sequence: ModuleType, lora: ModuleType, args: argparse.Namespace,
                 fam_lengths: set[int]):
        self.name, self.sequence = name, sequence
        self.model = copy.deepcopy(base)
        lora.apply_lora(self.model, rank=args.lora_rank, alpha=2.0 * args.lora_rank, seed=0)
        if name in ("merged", "unmerged"):
            for m in lora.lora_modules(self.model).values():
                m.merge = name == "merged"
        self.prompts = {f: torch.nn.Parameter(default_fam_prompt(self.model, f)) for f in sorted(fam_lengths)}
        params = list(self.prompts.values()) + lora.lora_parameters(self.model)  # AdamW skips those without grad
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.checkpoint = not args.no_grad_checkpoint
        self.autocast = args.precision == "bfloat16"

    def step(self, fam: FamConfig, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds, loss) of one training step; the optimizer step changes A and B as a real step
        does."""
        device = self.model.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        started, started_cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.sequence.forward_sequence(self.model, fam, tokens, fam_prompt=self.prompts[fam.fam_length],
                                                 checkpoint=self.checkpoint)
            terms = self.sequence.masked_loss(self.model, out.hidden, labels)
            # LossTerms now; a (loss, predictions) tuple in baselines older than distillation
            loss = (terms.loss if hasattr(terms, "loss") else terms[0]).float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync()
        return time.perf_counter() - started, time.process_time() - started_cpu, loss.item()


def parse_configs(text: str) -> list[tuple[int, ...]]:
    configs = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    if any(len(c) != 5 for c in configs):
        raise SystemExit("--configs: expected L,M,F,S,T groups separated by ';'")
    return configs


def profile_step(variant: Variant, fam: FamConfig, tokens: torch.Tensor, labels: torch.Tensor) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tokens.is_cuda else [])
    with profile(activities=activities) as prof:
        variant.step(fam, tokens, labels)
    sort = "self_cuda_time_total" if tokens.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def time_attention(model, modules: dict[str, ModuleType], configs: list[tuple[int, ...]], rounds: int,
                   batch: int, device: str, bf16: bool) -> list[dict]:
    """Seconds of one layer's block attention, forward and backward, per module (interleaved rounds), float32
    inputs, under bf16 autocast when `bf16`."""
    cfg = model.config
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g, results = torch.Generator().manual_seed(1), []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clock = time.process_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    for L, M, F, S, T in configs:
        fam = FamConfig(mode="fam", block_size=L, memory_blocks=M, fam_length=F, sink_tokens=S)
        nb = -(-T // L)
        shapes = [(batch, T, H, D), (batch, T, Hkv, D), (batch, T, Hkv, D), (batch, nb, Hkv, F, D),
                  (batch, nb, Hkv, F, D)]
        inputs = [torch.randn(s, generator=g).to(device) for s in shapes]  # q, k, v, FAM keys, FAM values
        plans = {n: m._Plan(model, fam, batch, T, torch.device(device), torch.float32) for n, m in modules.items()}
        seconds = {n: [] for n in modules}
        for r in range(rounds):
            for n, m in modules.items() if r % 2 == 0 else list(modules.items())[::-1]:
                q, k, v, fk, fv = (t.clone().requires_grad_() for t in inputs)
                sync()
                started = clock()
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    out = m._block_attention(plans[n], q, k, v, k, fk, fv)
                out.float().square().sum().backward()
                sync()
                seconds[n].append(clock() - started)
        for n in modules:
            results.append({"L": L, "M": M, "F": F, "S": S, "T": T, "variant": n, "seconds": seconds[n],
                            **{f"seconds_{k}": x for k, x in spread(seconds[n]).items()}})
    return results


def time_steps(args: argparse.Namespace, base, modules: dict, names: list[str], configs: list[tuple[int, ...]],
               measure: str) -> list[dict]:
    """Interleaved training steps of every variant (see the module docstring); prints the table."""
    variants = [Variant(n, base, *modules[n], args, {c[2] for c in configs}) for n in names]
    g = torch.Generator().manual_seed(0)
    batches, times, losses = {}, {}, {}
    for c in configs:
        L, M, F, S, T = c
        fam = FamConfig(mode="fam", block_size=L, memory_blocks=M, fam_length=F, sink_tokens=S)
        window = torch.randint(0, base.config.vocab_size, (args.batch_size, T + 1), generator=g).to(args.device)
        batches[c] = (fam, window[:, :-1], window[:, 1:])  # (B, T) tokens, (B, T) next-token labels
    for c in configs:  # equal first steps = the variants compute the same function
        fam, tokens, labels = batches[c]
        for v in variants:
            losses[c, v.name] = v.step(fam, tokens, labels)[2]  # warm-up, untimed
        first = losses[c, variants[0].name]
        for v in variants[1:]:
            if abs(losses[c, v.name] - first) > 1e-3 * abs(first):
                print(f"warning: {c}: first-step loss {v.name} {losses[c, v.name]:.6f} != "
                      f"{variants[0].name} {first:.6f}", file=sys.stderr)
    if args.profile:
        fam, tokens, labels = batches[configs[0]]
        for v in variants:
            print(f"\n--- {v.name}, L,M,F,S,T = {configs[0]}\n{profile_step(v, fam, tokens, labels)}")
    for r in range(args.rounds):
        for c in configs:
            fam, tokens, labels = batches[c]
            for v in variants if r % 2 == 0 else variants[::-1]:  # alternate the order too
                wall, cpu, _ = v.step(fam, tokens, labels)
                times.setdefault((c, v.name, "wall"), []).append(wall)
                times.setdefault((c, v.name, "cpu"), []).append(cpu)
                print(f"round {r + 1}: {c} {v.name} {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr,
                      flush=True)

    rows, results = [], []
    for c in configs:
        reference = times[c, variants[0].name, measure]
        for v in variants:
            s, wall = spread(times[c, v.name, measure]), spread(times[c, v.name, "wall"])
            ratio = spread([a / b for a, b in zip(reference, times[c, v.name, measure])])["median"]
            tokens = args.batch_size * c[4]
            rows.append([",".join(map(str, c)), v.name, f"{s['median']:.2f}", f"{s['min']:.2f}-{s['max']:.2f}",
                         f"{wall['median']:.2f}", f"{tokens / s['median']:.0f}", f"{ratio:.2f}x",
                         f"{losses[c, v.name]:.5f}"])
            results.append({"L": c[0], "M": c[1], "F": c[2], "S": c[3], "T": c[4], "variant": v.name,
                            "measure": measure, "seconds": times[c, v.name, measure],
                            "wall_seconds": times[c, v.name, "wall"], **{f"seconds_{k}": x for k, x in s.items()},
                            "tokens_per_s": tokens / s["median"], "speedup": ratio,
                            "first_loss": losses[c, v.name]})
    print_table(f"Training step, {args.model}, batch {args.batch_size}, {args.precision}, "
                f"{'no ' if args.no_grad_checkpoint else ''}grad checkpointing, {args.device} "
                f"({torch.get_num_threads()} threads), {args.rounds} rounds",
                ["L,M,F,S,T", "variant", f"{measure} s/step (median)", "min-max", "wall s (median)", "tok/s",
                 f"vs {variants[0].name}", "first loss"], rows)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = start(args)
    configs = parse_configs(args.configs)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    modules = {n: (sequence_module, lora_module) for n in ("current", "merged", "unmerged")}
    if "baseline" in names:
        modules["baseline"] = (module_at(args.baseline, "engine/training/sequence.py", "_baseline_sequence"),
                               module_at(args.baseline, "engine/training/lora.py", "_baseline_lora"))
    unknown = set(names) - set(modules)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)} (choose from baseline, current, merged, "
                         "unmerged)")
    measure = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    base = load_model(args.model, FamConfig(), mode="bswa", engine=EngineConfig(device=args.device)).model
    payload = {"benchmark": "train_step", "machine": machine, "args": vars(args), "results": []}
    if args.rounds > 0:
        payload["results"] = time_steps(args, base, modules, names, configs, measure)
    if args.attention:
        pair = {"baseline": modules["baseline"][0]} if "baseline" in modules else {}
        attention = time_attention(base, {**pair, "current": sequence_module}, configs, args.attention_rounds,
                                   args.batch_size, args.device, args.precision == "bfloat16")
        reference = {(r["L"], r["T"]): r["seconds_median"] for r in attention
                     if r["variant"] == attention[0]["variant"]}
        print_table(f"Block attention of one layer, forward + backward, {measure} seconds "
                    f"({args.attention_rounds} rounds)", ["L,M,F,S,T", "variant", "median", "min-max", "speed-up"],
                    [[f"{r['L']},{r['M']},{r['F']},{r['S']},{r['T']}", r["variant"], f"{r['seconds_median']:.3f}",
                      f"{r['seconds_min']:.3f}-{r['seconds_max']:.3f}",
                      f"{reference[r['L'], r['T']] / r['seconds_median']:.2f}x"] for r in attention])
        payload["attention"] = attention
    print(f"wrote {write_json(args.out, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
