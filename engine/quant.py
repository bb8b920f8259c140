"""Weight-only int4 for decode on the CPU: each projection's weights rounded to 4 bits in groups of 32 inputs with a
scale and a minimum per group (GGUF's Q4_1 scheme, so a Q4_1 checkpoint round-trips to its own values), read by
torch's packed int4 kernel when a step has few rows, and as dense bfloat16 of the same rounded values otherwise.

Why both: a decode step reads every weight for one row a stream, and is bound by the bytes it reads; 4 bits a weight
read by `_weight_int4pack_mm_for_cpu` take a third of the time of a bfloat16 matrix-vector product, and decode runs
about twice as fast (docs/benchmarks.md run P). A prefill step multiplies hundreds of rows and is bound by
arithmetic, where the int4 kernel is 10x slower than a bfloat16 (AMX) matmul. So the dense weights stay, holding
exactly the values the int4 kernel computes with (up to bfloat16's rounding of each weight): prompt and decode see
one model. It costs a quarter more weight memory, not less."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as fn
from torch import nn

GROUP = 32  # inputs sharing one scale and minimum (GGUF Q4_1's block)
MAX_INT4_ROWS = 8  # up to this many rows a step, the int4 kernel is faster than the dense bfloat16 matmul (measured)
LEVELS = 15  # 4 bits: q in 0..15
_PACK_INNER_TILES = 2  # the packing torch's CPU kernel reads


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def can_quantize(linear: nn.Linear) -> bool:
    """Whether the packed kernel takes this layer's shape: inputs in whole groups, outputs a multiple of 16."""
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


@dataclass
class Int4Weight:
    """(N, K) weights as torch's CPU int4 kernel reads them: packed 4-bit codes and, per group, the scale and the
    offset of code 8 ((K/GROUP, N, 2), in the activations' dtype), so that w = (q - 8) * scale + offset."""

    packed: torch.Tensor
    scales_offsets: torch.Tensor

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> tuple["Int4Weight", torch.Tensor]:
        """Round (N, K) weights to 4 bits a value, Q4_1's way: per group of 32, the minimum and (max - min) / 15.
        Returns the int4 weights for activations of `dtype` and dense weights of `dtype` equal to what the kernel
        computes with. Weights dequantized from a Q4_1 file in float32 get their own codes back."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // GROUP, GROUP)
        low, high = w.amin(-1), w.amax(-1)
        scale = (high - low) / LEVELS
        step = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
        codes = ((w - low[..., None]) / step[..., None]).round().clamp(0, LEVELS).to(torch.int32)
        scales_offsets = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        scales_offsets = scales_offsets.to(dtype)  # the kernel reads them in the activations' dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(n, k), _PACK_INNER_TILES)
        so = scales_offsets.float().transpose(0, 1)  # (N, K/GROUP, 2)
        dense = (codes.float() - 8) * so[..., :1] + so[..., 1:]
        return cls(packed, scales_offsets), dense.reshape(n, k).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, K) bfloat16 -> (T, N)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_offsets)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_offsets.nbytes


class Int4DecodeLinear(nn.Linear):
    """An nn.Linear (same name, same dense weight, so adapters and state dicts see no change) that reads its int4
    copy for steps of at most MAX_INT4_ROWS rows."""

    int4: Int4Weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int4DecodeLinear":
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.int4, dense = Int4Weight.quantize(linear.weight, dtype)
        out.weight = nn.Parameter(dense, requires_grad=False)
        out.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] > MAX_INT4_ROWS:
            return fn.linear(x, self.weight, self.bias)
        y = self.int4.matmul(x)
        return y if self.bias is None else y + self.bias


def quantize_int4(layers: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every nn.Linear under `layers` (a decoder's layers: the output projection keeps its precision, as
    GGUF files keep theirs at 6-8 bits) whose shape the kernel takes with an Int4DecodeLinear of `dtype`. They must
    be on the CPU, an adapter already merged; best in float32, as loaded (a Q4_1 file's weights then keep their
    codes). Returns the bytes the int4 copies add."""
    device = next(layers.parameters()).device
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValueError(f"int4 weights run on the CPU in bfloat16, not {device.type} {dtype}")
    if not int4_kernel_available():
        raise ValueError(f"this torch ({torch.__version__}) has no CPU int4 kernel (_weight_int4pack_mm_for_cpu)")
    added = 0
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_quantize(child):
                quantized = Int4DecodeLinear.from_linear(child, dtype)
                setattr(parent, name, quantized)
                added += quantized.int4.nbytes
    return added
