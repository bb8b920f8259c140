"""FamLoRA: low-rank deltas that only the FAM rows' computation uses, so a FAM adapter can teach the memory without
touching how any token is computed.

A FAM adapter's ordinary LoRA (adapter.py) is merged into the weights and changes every row, tokens included: the
measured cost was chat quality (docs/training.md). With FamLoRA the token rows keep the base model's weights exactly;
the deltas apply where the FAM rows go through a projection: the FAM prompt's pass to FAM_0, the FAM rows' keys and
values, and the FAM update (its queries, output projection and MLP). A token then differs from BSWA only through
the F FAM keys it attends to. The deltas cannot be merged (the tokens share the weights), so they run unmerged: F
rows per block per layer, a few small matmuls.

A delta on a projection W computes W x + (x A^T B^T) * scale, A (r, in), B (out, r), as LoRA does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as fn
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_OWNER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class LayerDelta(nn.Module):
    """The deltas of one decoder layer, by projection name (q_proj, ..., down_proj)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.a = nn.ParameterDict({n: nn.Parameter(torch.zeros(rank, i)) for n, (i, _) in shapes.items()})
        self.b = nn.ParameterDict({n: nn.Parameter(torch.zeros(o, rank)) for n, (_, o) in shapes.items()})

    def project(self, name: str, linear: nn.Linear, x: torch.Tensor, rows: int | torch.Tensor = 0) -> torch.Tensor:
        """linear(x) plus this layer's delta on `name`, if it has one, on some rows only: rows first.. for an int
        (the FAM rows of a pass that also carries token rows before them), or where a (T,) bool tensor is true
        (token rows of streams past their window as well, FamConfig.fam_after_window)."""
        y = linear(x)
        if name not in self.a:
            return y
        if isinstance(rows, torch.Tensor):
            delta = fn.linear(fn.linear(x, self.a[name]), self.b[name]) * self.scale
            return y + delta * rows[:, None].to(delta.dtype)
        delta = fn.linear(fn.linear(x[rows:], self.a[name]), self.b[name]) * self.scale
        return y + delta if rows == 0 else torch.cat([y[:rows], y[rows:] + delta])


class FamLoRA(nn.Module):
    """One LayerDelta per decoder layer. Fresh (B = 0) it changes nothing; `init_a` draws A as LoRA does."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...], rank: int, scale: float):
        super().__init__()
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"lora_targets: unknown module names {unknown} (choose from {', '.join(TARGETS)})")
        if rank <= 0:
            raise ValueError(f"lora_rank: must be positive, got {rank}")
        self.rank, self.scale = rank, scale
        self.layers = nn.ModuleList()
        for layer in model.model.layers:
            shapes = {}
            for name in targets:
                linear = getattr(getattr(layer, _OWNER[name]), name)
                linear = getattr(linear, "base", linear)  # under a training LoRA wrap (LoRALinear)
                shapes[name] = (linear.in_features, linear.out_features)
            self.layers.append(LayerDelta(shapes, rank, scale))

    def init_a(self, generator: torch.Generator) -> None:
        """A uniform in +-1/sqrt(in) (nn.Linear's default bound, as LoRA draws it); B stays zero."""
        with torch.no_grad():
            for layer in self.layers:
                for a in layer.a.values():
                    bound = 1 / math.sqrt(a.shape[1])
                    a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """HF module name (model.layers.3.self_attn.q_proj) -> (A, B), the adapter file's naming."""
        return {f"model.layers.{l}.{_OWNER[n]}.{n}": (layer.a[n], layer.b[n])
                for l, layer in enumerate(self.layers) for n in layer.a}

    def load_pairs(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], where: str) -> None:
        """Set every delta from `pairs` (named as `pairs()` names them); the names and shapes must match."""
        mine = self.pairs()
        if set(pairs) != set(mine):
            raise ValueError(f"{where}: FAM-row LoRA on {len(pairs)} modules, this model on {len(mine)} "
                             f"(the same --lora-targets are needed)")
        with torch.no_grad():
            for name, (a, b) in pairs.items():
                my_a, my_b = mine[name]
                if a.shape != my_a.shape or b.shape != my_b.shape:
                    raise ValueError(f"{where}: FAM-row LoRA of rank {a.shape[0]} on {name}, expected {self.rank}")
                my_a.copy_(a)
                my_b.copy_(b)

    @classmethod
    def from_pairs(cls, model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                   where: str) -> FamLoRA:
        """The FamLoRA of an adapter file for `model` (targets and rank read from the names and shapes)."""
        targets = tuple(sorted({name.rsplit(".", 1)[1] for name in pairs}))
        ranks = {a.shape[0] for a, _ in pairs.values()}
        if len(ranks) != 1:
            raise ValueError(f"{where}: FAM-row LoRA with mixed ranks {sorted(ranks)}")
        out = cls(model, targets, ranks.pop(), scale)
        out.load_pairs(pairs, where)
        return out
