"""Where one engine step's time goes: kernels per step and the device's busy time against the wall time, for a
decode step (one token per stream) and a prefill step (one chunk of one stream), through torch's profiler. A
diagnostic, not a benchmark: it prints a table per step kind and writes JSON.

    python bench/profile_step.py --device cuda --dtype bfloat16 --random-shape smollm2-135m
    python bench/profile_step.py --threads 2                        # the CPU: operators instead of kernels

Run with a window already full (--context >= (M+1) L), so every step has the shapes of a long stream's."""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import start, write_json
from famserve.engine.build import DTYPES
from famserve.engine.config import FamConfig
from famserve.engine.model import FamModel
from famserve.engine.runner import ModelRunner
from throughput import RANDOM_SHAPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default="smollm2-135m")
    p.add_argument("--modes", default="bswa,fam", help="comma-separated attention modes")
    p.add_argument("--context", type=int, default=8192, help="tokens read before the profiled steps")
    p.add_argument("--prefill-chunk", type=int, default=512, help="tokens of the profiled prefill step")
    p.add_argument("--streams", type=int, default=1, help="streams decoding together in the decode step")
    p.add_argument("--steps", type=int, default=5, help="profiled steps of each kind (after as many untimed)")
    p.add_argument("--top", type=int, default=15, help="operators listed per step kind")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results/profile_step.json")
    return p.parse_args(argv)


def profiled(fn, steps: int, device: str) -> dict:
    """Run fn `steps` times untimed, then `steps` times under the profiler; per-step numbers."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(steps):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": wall * 1e3,  # with the profiler's own overhead
        "kernels": sum(e.count for e in on_device) / steps,
        "device_busy_ms": sum(e.self_device_time_total for e in on_device) / steps / 1e3,
        "operators": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
        "top": [{"name": e.key, "calls": e.count / steps, "self_cpu_ms": e.self_cpu_time_total / steps / 1e3,
                 "self_device_ms": e.self_device_time_total / steps / 1e3} for e in top],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = start(args)
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = FamModel(RANDOM_SHAPES[args.random_shape], FamConfig(mode=mode))
        model.eval().requires_grad_(False)
        model.to_device(args.device, DTYPES[args.dtype])
        runner = ModelRunner(model)
        ids = torch.randint(3, model.config.vocab_size, (args.context,))
        with torch.inference_mode():
            states = [model.new_state() for _ in range(args.streams)]
            for state in states:
                runner.prefill(state, [ids])

            def prefill_step() -> None:  # the stream goes on: steady-state shapes, block completions included
                runner.run(states[:1], [torch.randint(3, model.config.vocab_size, (args.prefill_chunk,))])

            def decode_step() -> None:
                runner.decode(states, [5] * len(states))

            for kind, fn in (("decode", decode_step), ("prefill", prefill_step)):
                row = {"mode": mode, "step": kind, **profiled(fn, args.steps, args.device)}
                results.append(row)
                print(f"{mode} {kind}: {row['wall_ms']:.1f} ms a step, {row['operators']:.0f} aten operators, "
                      f"{row['kernels']:.0f} device kernels, device busy {row['device_busy_ms']:.2f} ms")
                for op in row["top"][:args.top]:
                    print(f"    {op['name'][:60]:<60} {op['calls']:7.0f} calls  cpu {op['self_cpu_ms']:8.3f} ms  "
                          f"device {op['self_device_ms']:8.3f} ms")
    path = write_json(args.out, {"benchmark": "profile_step", "machine": machine, "args": vars(args),
                                 "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
