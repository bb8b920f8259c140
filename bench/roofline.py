"""The machine's limits measured in the same run as a benchmark (a matmul's FLOP/s, a copy's bytes/s) and the work a
Llama-family model does (FLOPs of a prefill, bytes read by a decode step), so a speed can be stated as a fraction
of what the hardware allows:

    python bench/roofline.py --device cpu --dtype float32 --threads 2

Counting rules (useful work, the usual convention): a matmul of (m, k) x (k, n) is 2mkn FLOPs; attention is 4*H*D
FLOPs per (query, visible key) pair (QK^T and PV), masked-out keys not counted; a decode step reads every weight once
and the keys/values it attends to once. The copy bandwidth counts bytes read plus bytes written."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common import print_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the machine -------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], None], sync: Callable[[], None], repeats: int) -> list[float]:
    fn()  # warm-up: first-touch page faults, kernel selection
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _sync_for(device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def matmul_peak(device: str, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a square matmul into a preallocated output; best and median of `repeats`."""
    n = size or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = _timed(lambda: torch.matmul(a, b, out=out), _sync_for(device), repeats)
    flops = 2.0 * n**3
    return {"size": n, "best_flop_s": flops / min(times), "median_flop_s": flops / statistics.median(times)}


def copy_bandwidth(device: str, dtype: torch.dtype, nbytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Bytes/s (read + written) of copying one buffer into another that already exists; best and median."""
    numel = nbytes // torch.tensor([], dtype=dtype).element_size()
    src = torch.ones(numel, device=device, dtype=dtype)
    dst = torch.zeros(numel, device=device, dtype=dtype)
    times = _timed(lambda: dst.copy_(src), _sync_for(device), repeats)
    moved = 2.0 * numel * src.element_size()
    return {"nbytes": numel * src.element_size(), "best_bytes_s": moved / min(times),
            "median_bytes_s": moved / statistics.median(times)}


def measure_peaks(device: str, dtype_name: str) -> dict[str, dict[str, float]]:
    dtype = DTYPES[dtype_name]
    return {"matmul": matmul_peak(device, dtype), "copy": copy_bandwidth(device, dtype)}


# --- the model's work --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the counts need of a Llama-family model (famserve's ModelConfig has these fields)."""

    num_layers: int  # N
    hidden_size: int  # C
    intermediate_size: int  # I
    num_heads: int  # H
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    vocab_size: int  # V

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim, config.vocab_size)

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matmuls (norms left out)."""
        c, hd, kvd = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return c * hd + 2 * c * kvd + hd * c + 3 * c * self.intermediate_size

    @property
    def matmul_params(self) -> int:
        """Every weight a token's forward pass multiplies with, the output projection included."""
        return self.num_layers * self.layer_params + self.hidden_size * self.vocab_size

    def attention_flops(self, pairs: float) -> float:
        """FLOPs of `pairs` (query row, visible key) pairs summed over the layers."""
        return 4.0 * self.num_heads * self.head_dim * pairs * self.num_layers

    def kv_bytes(self, num_keys: float, element_bytes: float) -> float:
        """Bytes of keys and values for `num_keys` positions in every layer."""
        return 2.0 * self.num_layers * self.num_kv_heads * self.head_dim * num_keys * element_bytes


@dataclass(frozen=True)
class Window:
    """How far a query sees: None for causal attention over everything (HF, llama.cpp, famserve full)."""

    block_size: int = 0  # L
    memory_blocks: int = 0  # M
    fam_rows: int = 0  # F (0 for BSWA)
    sink_tokens: int = 0  # S


def _causal_pairs(first: int, last: int) -> float:
    """Sum over query positions t in [first, last) of (t + 1) visible keys."""
    return (last * (last + 1) - first * (first + 1)) / 2.0


def visible_keys(window: Window | None, position: int) -> int:
    """Keys a query at `position` attends to."""
    if window is None:
        return position + 1
    lo = position - position % window.block_size - window.memory_blocks * window.block_size  # window start
    sinks = window.sink_tokens if lo > 0 else 0
    return min(position + 1, position + 1 - lo) + sinks + window.fam_rows


def prefill_flops(shape: Shape, num_tokens: int, window: Window | None, logits_rows: int = 1) -> float:
    """FLOPs of reading `num_tokens` from an empty state: every token's matmuls, its attention, the FAM updates of
    completed blocks, and `logits_rows` rows of the output projection."""
    dense = 2.0 * num_tokens * shape.num_layers * shape.layer_params
    head = 2.0 * logits_rows * shape.hidden_size * shape.vocab_size
    if window is None:
        return dense + head + shape.attention_flops(_causal_pairs(0, num_tokens))
    length, span = window.block_size, window.memory_blocks * window.block_size
    pairs = 0.0
    for start in range(0, num_tokens, length):
        end = min(start + length, num_tokens)
        lo = max(0, start - span)
        pairs += (end - start) * (start - lo) + _causal_pairs(0, end - start)  # memory blocks + causal block
        pairs += (end - start) * (window.fam_rows + (window.sink_tokens if lo > 0 else 0))
    fam = 0.0
    if window.fam_rows:
        updates = num_tokens // length
        f = window.fam_rows
        # Each update: F rows through a whole layer (attending to F + L keys), then the new FAM's keys/values.
        kv_proj = 2.0 * f * shape.hidden_size * 2 * shape.num_kv_heads * shape.head_dim
        per_update = 2.0 * f * shape.layer_params + 4.0 * shape.num_heads * shape.head_dim * f * (f + length) + kv_proj
        fam = updates * shape.num_layers * per_update
    return dense + head + shape.attention_flops(pairs) + fam


def decode_bytes(shape: Shape, position: int, window: Window | None, weight_bytes: float,
                 kv_element_bytes: float) -> float:
    """Bytes one decode step at `position` reads: all weights once (`weight_bytes` in total) and the keys/values of
    the positions it attends to."""
    return weight_bytes + shape.kv_bytes(visible_keys(window, position), kv_element_bytes)


# --- command line ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = measure_peaks(args.device, args.dtype)
    m, c = peaks["matmul"], peaks["copy"]
    print_table(f"machine limits, {args.device} {args.dtype}, {torch.get_num_threads()} threads",
                ["what", "best", "median"],
                [[f"matmul {m['size']}^3, GFLOP/s", f"{m['best_flop_s'] / 1e9:.1f}", f"{m['median_flop_s'] / 1e9:.1f}"],
                 [f"copy {c['nbytes'] // 2**20} MiB, GB/s (read + write)", f"{c['best_bytes_s'] / 1e9:.1f}",
                  f"{c['median_bytes_s'] / 1e9:.1f}"]])


if __name__ == "__main__":
    main()
