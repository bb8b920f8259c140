"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen nn.Linear modules of a FamModel, and their export with the FAM
prompt as a FamAdapter (engine/adapter.py), which the engine merges into the weights at load time.

A wrapped linear computes base(x) + (x A^T B^T) * alpha / rank with A (r, in), B (out, r); B starts at zero, so a
freshly wrapped model computes exactly what the base model does. Only A and B (and the FAM prompt) are trained.

On a GPU or under autocast it computes that as one matmul with the merged weight W' = W + (B @ A) * alpha / rank,
formed once and reused until A, B or W change (in-place updates bump their version counters): a training step calls
each projection once for the tokens and once per block for the FAM rows, then again when checkpointing recomputes
the layer, and all those calls share one W' (the engine merges an exported adapter the same way). The gradients to
A and B are the low-rank ones, computed in _MergedLoRA.backward from the call's input and output gradient (autograd
through W' would form a full (out, in) weight gradient per call). On a GPU that is one kernel per call instead of
five; under autocast W' is kept in the autocast dtype, where the textbook form casts the frozen W again at every call
(autocast caches casts only of weights that require grad). On the CPU in float32 the textbook form stays: forming W'
is a pass over the weights per step that costs about what merging saves (docs/training.md, "Cost on this machine")."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as fn
from torch import nn

from famserve.engine.adapter import FamAdapter
from famserve.engine.config import FamConfig
from famserve.engine.fam_lora import TARGETS as ALL_TARGETS
from famserve.engine.fam_lora import FamLoRA
from famserve.engine.model import FamModel


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
        self.merge: bool | None = None  # None: merged on a GPU or under autocast; True/False force one form
        self.enabled = True  # False: compute the frozen base alone (the distillation teacher, see lora_disabled)
        self._merged: torch.Tensor | None = None  # (out, in) W' in the compute dtype
        self._merged_key: tuple | None = None  # what _merged was formed from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and x.dtype != torch.float64  # autocast leaves float64 alone
        merge = (device == "cuda" or autocast) if self.merge is None else self.merge
        if not merge or self.base.weight.requires_grad:  # W' carries no gradient to a trained base weight
            return self.base(x) + fn.linear(fn.linear(x, self.lora_a), self.lora_b) * self.scale
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype  # what autocast's linear would run in
        weight = self.merged_weight(dtype)
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        if not torch.is_grad_enabled() or not (self.lora_a.requires_grad or self.lora_b.requires_grad):
            return fn.linear(x.to(dtype), weight, bias)
        with torch.autocast(device, enabled=False):  # dtypes are settled above; backward runs without autocast
            return _MergedLoRA.apply(x.to(dtype), weight, bias, self.lora_a, self.lora_b, self.scale)

    def merged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) W + (B @ A) * scale in `dtype`, no autograd history; formed again only when A, B or W changed
        (the optimizer's in-place step bumps their versions) or another dtype is asked for."""
        w, a, b = self.base.weight, self.lora_a, self.lora_b
        key = (dtype, w.data_ptr(), w._version, a.data_ptr(), a._version, b.data_ptr(), b._version)
        if self._merged_key != key:
            with torch.no_grad():  # one pass over W (FamAdapter.merge_into forms the same sum)
                self._merged = torch.addmm(w, b, a, alpha=self.scale).to(dtype)
            self._merged_key = key
        return self._merged


class _MergedLoRA(torch.autograd.Function):
    """y = x W'^T + bias with W' = W + (B @ A) * scale already formed (no history); backward returns the gradients
    of x, A and B of base(x) + (x A^T B^T) * scale. x (..., in), W' (out, in), A (r, in), B (out, r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale = scale
        return fn.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight  # (..., in)
        rows_x, rows_g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (n, in), (n, out)
        a_c, b_c = a.to(grad.dtype), b.to(grad.dtype)  # bf16 under autocast, like the unmerged form's matmuls
        if ctx.needs_input_grad[4]:  # dB = scale * g^T (x A^T)
            grad_b = (rows_g.t() @ (rows_x @ a_c.t()) * ctx.scale).to(b.dtype)  # (out, r)
        if ctx.needs_input_grad[3]:  # dA = scale * (g B)^T x
            grad_a = ((rows_g @ b_c).t() @ rows_x * ctx.scale).to(a.dtype)  # (r, in)
        return grad_x, None, None, grad_a, grad_b, None


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


def apply_fam_lora(model: FamModel, targets: Iterable[str] = ALL_TARGETS, rank: int = 8, alpha: float = 16.0,
                   seed: int = 0, after_window: bool = False) -> None:
    """`--lora-scope fam`: trainable LoRA that only the FAM rows use (engine/fam_lora.py); freeze everything else
    but the token LoRA that apply_lora may have wrapped before (`--token-lora-targets`). Without token LoRA the
    token rows keep the base weights, so the model differs from BSWA only through the FAM keys tokens see.
    after_window (`--fam-after-window` with `--lora-scope all`): the tokens past the window use it too."""
    keep = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    fam_lora = FamLoRA(model, tuple(targets), rank, alpha / rank)
    fam_lora.init_a(torch.Generator().manual_seed(seed))
    model.set_fam_lora(fam_lora, after_window=after_window)


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the wrapped modules compute their frozen base weights only: the model as it was before
    LoRA, which `famserve train --distill-weight` reads as its teacher without holding a second copy."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_a, m.lora_b)]


def load_adapter_weights(model: FamModel, fam_prompt: nn.Parameter, adapter: FamAdapter) -> None:
    """Set every wrapped module's (A, B), the FAM-row LoRA's and the FAM prompt P to an exported adapter's, so that a
    new run starts where that adapter's run ended (`famserve train --init-adapter`: new optimizer, schedule and
    data, the weights kept). The adapter must be for this model, with LoRA of the same scope on the same modules at
    the same rank and alpha/rank, and the same F; its L, M, S may differ from the new run's. One growth is allowed:
    a FAM-row adapter without token LoRA starts a run that adds it (`--token-lora-targets`; fresh, B = 0)."""
    adapter.check_compatible(model.config)
    where = f"init_adapter: {adapter.source or 'the adapter'}"
    if model.lora_after_window:  # every-row LoRA kept unmerged (fam_after_window): an every-row adapter's fits
        if adapter.fam_lora or not adapter.lora:
            raise ValueError(f"{where} has {'FAM-row' if adapter.fam_lora else 'no'} LoRA; a --fam-after-window "
                             "run with --lora-scope all starts from an adapter with every-row LoRA only")
        adapter = replace(adapter, lora={}, fam_lora=adapter.lora)
    modules = lora_modules(model)
    if bool(adapter.fam_lora) != (model.fam_lora is not None):
        raise ValueError(f"{where} has {'FAM-row' if adapter.fam_lora else 'every-row'} LoRA, this run "
                         f"{'FAM-row' if model.fam_lora is not None else 'every-row'} (--lora-scope)")
    if set(adapter.lora) != set(modules) and not (adapter.fam_lora and not adapter.lora):
        raise ValueError(f"{where} has LoRA on {len(adapter.lora)} modules, this run wraps {len(modules)} "
                         f"(--lora-targets must name the same projections)")
    for name, (a, b) in adapter.lora.items():
        m = modules[name]
        if a.shape != m.lora_a.shape or b.shape != m.lora_b.shape:
            raise ValueError(f"{where} has LoRA rank {a.shape[0]} on {name}, this run rank {m.rank} (--lora-rank)")
    scales = _lora_scales(model)
    scale = scales.pop() if scales else adapter.lora_scale  # apply_lora and fam-row LoRA give all one scale
    if not math.isclose(adapter.lora_scale, scale, rel_tol=1e-6):
        raise ValueError(f"{where} has LoRA scale alpha/rank {adapter.lora_scale:g}, this run {scale:g} (--lora-alpha)")
    if adapter.fam_prompt.shape != fam_prompt.shape:
        raise ValueError(f"{where} has F={adapter.fam_length} FAM rows, this run F={fam_prompt.shape[0]} "
                         f"(--fam-length)")
    if model.fam_lora is not None:
        model.fam_lora.load_pairs(adapter.fam_lora, where)
    with torch.no_grad():
        for name, (a, b) in adapter.lora.items():
            modules[name].lora_a.copy_(a)
            modules[name].lora_b.copy_(b)
        fam_prompt.copy_(adapter.fam_prompt)


def export_adapter(model: FamModel, fam_prompt: torch.Tensor, base_model_id: str, fam: FamConfig) -> FamAdapter:
    """The FamAdapter the engine loads: the FAM prompt (F, C), every LoRA delta (of either scope) as (A, B) with
    scale alpha/rank, the base model's fingerprint and id, and the L, M, S it was trained with."""
    modules = lora_modules(model)
    scales = _lora_scales(model)
    if len(scales) > 1:
        raise ValueError("all LoRA modules must share one alpha/rank to export as one adapter")
    lora = {name: (_saved(m.lora_a), _saved(m.lora_b)) for name, m in modules.items()}
    fam_pairs = {} if model.fam_lora is None else model.fam_lora.pairs()
    fam_lora = {name: (_saved(a), _saved(b)) for name, (a, b) in fam_pairs.items()}
    if model.lora_after_window:  # every-row LoRA, run unmerged past the window: saved as every-row LoRA
        lora, fam_lora = fam_lora, {}
    return FamAdapter(fam_prompt=_saved(fam_prompt), base_fingerprint=model.config.fingerprint(),
                      base_model_id=base_model_id, block_size=fam.block_size, memory_blocks=fam.memory_blocks,
                      sink_tokens=fam.sink_tokens, lora=lora, lora_scale=scales.pop() if scales else 1.0,
                      fam_lora=fam_lora, fam_after_window=fam.gates_fam)


def _lora_scales(model: FamModel) -> set[float]:
    """The alpha/rank of every LoRA in the model, every-row and FAM-row (one value when the trainer made them)."""
    scales = {m.scale for m in lora_modules(model).values()}
    return scales if model.fam_lora is None else scales | {model.fam_lora.scale}


def _saved(t: torch.Tensor) -> torch.Tensor:
    """A trained tensor as an adapter file keeps it: float32 on the CPU, detached from training."""
    return t.detach().float().cpu().clone()
