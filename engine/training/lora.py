"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen nn.Linear modules of a FamModel, and their export with the FAM
prompt as a FamAdapter (engine/adapter.py), which the engine merges into the weights at load time.

A wrapped linear computes base(x) + (x A^T B^T) * alpha / rank with A (r, in), B (out, r); B starts at zero, so a
freshly wrapped model computes exactly what the base model does. Only A and B (and the FAM prompt) are trained."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as fn
from torch import nn

from famserve.engine.adapter import FamAdapter
from famserve.engine.config import FamConfig
from famserve.engine.model import FamModel

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank delta."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))  # (out, r)
        bound = 1 / math.sqrt(base.in_features)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
        with torch.no_grad():
            self.lora_a.copy_(torch.rand(self.lora_a.shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + fn.linear(fn.linear(x, self.lora_a), self.lora_b) * self.scale


def apply_lora(model: FamModel, targets: Iterable[str] = ALL_TARGETS, rank: int = 8, alpha: float = 16.0,
               seed: int = 0) -> list[str]:
    """Replace every nn.Linear of the decoder layers whose attribute name is in `targets` by a LoRALinear; freeze
    everything else. Returns the wrapped module names (HF names, e.g. model.layers.0.self_attn.q_proj)."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"lora_targets: unknown module names {unknown} (choose from {', '.join(ALL_TARGETS)})")
    if rank <= 0:
        raise ValueError(f"lora_rank: must be positive, got {rank}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = []
    for name, module in list(model.model.layers.named_modules()):
        for attr in targets:
            child = getattr(module, attr, None)
            if isinstance(child, nn.Linear):
                setattr(module, attr, LoRALinear(child, rank, alpha, generator))
                wrapped.append(f"model.layers.{name}.{attr}")
    return sorted(wrapped)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_a, m.lora_b)]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (for training checkpoints)."""
    return {f"{name}.{part}": getattr(m, part).detach().clone()
            for name, m in lora_modules(model).items() for part in ("lora_a", "lora_b")}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model)
    expected = {f"{name}.{part}" for name in modules for part in ("lora_a", "lora_b")}
    if set(state) != expected:
        raise ValueError("LoRA state does not match the wrapped modules (different targets or model)")
    with torch.no_grad():
        for key, value in state.items():
            name, part = key.rsplit(".", 1)
            getattr(modules[name], part).copy_(value)


def export_adapter(model: FamModel, fam_prompt: torch.Tensor, base_model_id: str, fam: FamConfig) -> FamAdapter:
    """The FamAdapter the engine loads: the FAM prompt (F, C), every LoRA delta as (A, B) with scale alpha/rank,
    the base model's fingerprint and id, and the L, M, S it was trained with."""
    modules = lora_modules(model)
    scales = {m.scale for m in modules.values()}
    if len(scales) > 1:
        raise ValueError("all LoRA modules must share one alpha/rank to export as one adapter")
    lora = {name: (m.lora_a.detach().float().cpu().clone(), m.lora_b.detach().float().cpu().clone())
            for name, m in modules.items()}
    return FamAdapter(fam_prompt=fam_prompt.detach().float().cpu().clone(), base_fingerprint=model.config.fingerprint(),
                      base_model_id=base_model_id, block_size=fam.block_size, memory_blocks=fam.memory_blocks,
                      sink_tokens=fam.sink_tokens, lora=lora, lora_scale=scales.pop() if scales else 1.0)
