"""The differentiable, all-at-once form of FamModel, for training: hidden rows (and logits) of whole token sequences
(B, T), with gradients to the weights, to the FAM prompt P, and through memory segments and FAM across blocks (no
stop-gradient; FAM-SPEC.md "Training").

The streaming engine (model.py) writes keys/values in place into preallocated state under no_grad; this module
computes the same function (docs/engine.md; tests check it against the engine at 1e-9 in float64) with the same
modules and weights. Per layer:

* the FAM recurrence, looping over the blocks (F rows each): FAM_prev of block i, as queries at b-F..b-1, attends
  to [FAM_prev ; the whole block i] and becomes FAM_prev of block i+1 (zero attention residual in the very first
  update; a partial last block updates nothing). It needs only the layer's token keys/values, so it runs first;
* then the token rows of all blocks: the queries of block i attend to [S sinks re-rotated to w-S..w-1 (only when
  w = b - M*L > 0) | the F FAM_prev rows of block i at b-F..b-1 | the tokens of its window from max(w, 0) (memory
  blocks and its own block, causal)]. Put in that order, every query sees every key before its own block and its
  block causally: a causal mask aligned to the bottom-right corner, the same for every block, so SDPA runs a fused
  kernel (no explicit block-structured mask). The blocks whose window has left position 0 (i > M) go in one
  batched call; the first M+1 blocks (shorter windows, no sinks) one call each. Work and memory are linear in T.

What a training step starts from: a sequence always starts at position 0 with empty memory and its own first S
tokens as sinks (memory segments and sinks do not carry across steps). Only the FAM may carry over (Random State
Passing): `start_fam` is any per-layer FAM, and `fresh` says which rows start from FAM_0 (their first update uses
the zero residual) and which continue a previous sequence's FAM. A carried FAM is detached by the caller: the
graph of one step never reaches into the previous one. This equals the engine on a new stream whose `fam` was
replaced by the carried FAM (with num_fam_updates > 0 for the continuing rows).

Under FamConfig.fam_after_window the tokens of a fresh row's first M+1 blocks neither see the FAM nor take the
LoRA (model.lora_after_window: the adapter's deltas, FamLoRA, run unmerged on the FAM rows and the later tokens), as
the engine does; a continuing row stands for a stream whose window has long moved on, so all its tokens do.

Dimensions as in model.py: B sequences, T tokens, nb blocks, C hidden, H / Hkv heads, D head dim, N layers,
L block size, M memory blocks, F FAM rows, S sinks, W = (M+1)*L window keys, V vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as fn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from famserve.engine.config import FamConfig
from famserve.engine.fam_lora import LayerDelta
from famserve.engine.model import DecoderLayer, FamModel
from famserve.engine.rope import rotate


@dataclass
class SequenceOutput:
    hidden: torch.Tensor  # (B, T, C) the last layer's token rows, before the final norm (model.logits applies it)
    fam: torch.Tensor | None  # (N, B, F, C) FAM after the last complete block (the start FAM if none); None if F=0
    num_fam_updates: int  # complete blocks, i.e. FAM updates done per row


def default_fam_prompt(model: FamModel, fam_length: int) -> torch.Tensor:
    """(F, C) the engine's default FAM prompt (FamModel.default_fam_prompt) for any F: the mean token embedding."""
    return model.model.embed_tokens.weight.mean(dim=0).expand(fam_length, -1).clone()


class _Plan:
    """Everything about a forward pass that does not depend on the layer: positions and rotations."""

    def __init__(self, model: FamModel, fam: FamConfig, batch: int, num_tokens: int, device: torch.device,
                 dtype: torch.dtype):
        cfg = model.config
        self.batch, self.num_tokens = batch, num_tokens
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.is_full = fam.mode == "full"
        self.L = num_tokens if self.is_full else fam.block_size
        self.M = 0 if self.is_full else fam.memory_blocks
        self.F = fam.num_fam_rows
        self.num_blocks = -(-num_tokens // self.L)  # nb
        self.num_complete = num_tokens // self.L  # blocks that update the FAM
        rot = model.rotary
        cos, sin = rot.cos_sin(torch.arange(num_tokens, device=device), dtype)  # (T, D)
        self.cos, self.sin = cos.repeat(batch, 1), sin.repeat(batch, 1)  # (B*T, D)
        self.S = 0
        self.gated = fam.gates_fam
        # Whether some rows' first M+1 blocks see the FAM, and some do not (forward_sequence sets them from `fresh`)
        self.some_see_fam_early = self.some_see_no_fam_early = False
        if self.is_full:
            return  # plain causal attention: no blocks, sinks or FAM
        starts = torch.arange(self.num_blocks, device=device) * self.L  # (nb,) block starts b
        # Blocks 0..M ("head") have windows that start at or before position 0: no sinks, fewer memory tokens.
        # Blocks M+1.. ("tail") have the full window, w = b - M*L > 0, and the sinks when S > 0.
        self.num_head = min(self.M + 1, self.num_blocks)
        self.num_tail = self.num_blocks - self.num_head
        # Sinks: used only by blocks whose window has left position 0; skipped when no block has.
        self.S = fam.num_sinks if self.num_tail else 0
        if self.S:
            window_starts = starts[self.num_head:] - self.M * self.L  # (nt,) w of the tail blocks
            pos = window_starts[:, None] - self.S + torch.arange(self.S, device=device)  # (nt, S)
            cos_s, sin_s = rot.cos_sin(pos.flatten(), dtype)  # (nt*S, D)
            self.sink_cos, self.sink_sin = cos_s.repeat(batch, 1), sin_s.repeat(batch, 1)  # (B*nt*S, D)
        if self.F:
            pos = starts[:, None] - self.F + torch.arange(self.F, device=device)  # (nb, F)
            cos_f, sin_f = rot.cos_sin(pos.flatten(), dtype)  # (nb*F, D)
            self.fam_cos = cos_f.view(self.num_blocks, self.F, -1).repeat(1, batch, 1)  # (nb, B*F, D)
            self.fam_sin = sin_f.view(self.num_blocks, self.F, -1).repeat(1, batch, 1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, D), every query seeing every key."""
    return fn.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _causal_bottom_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         fused_bias: bool | None = None) -> torch.Tensor:
    """q (N, H, Lq, D); k, v (N, Hkv, Lk, D) with Lk >= Lq -> (N, H, Lq, D): query r sees keys 0..Lk-Lq+r (all keys
    before the last Lq, then causally), i.e. the queries are the last Lq of the key rows.

    Chosen so that SDPA runs a fused kernel (a per-block mask on 5-D tensors sent it to its math path, which
    materialises every score). CPU: one (Lq, Lk) boolean mask broadcast over N and the heads, which the CPU flash
    kernel takes. GPU (fused_bias): torch's bottom-right CausalBias, no mask tensor: SDPA runs flash attention
    (bf16/fp16, grouped heads as they are) or memory-efficient attention (float32; it needs the key/value heads
    repeated to H)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == lk:
        return fn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if fused_bias is None:
        fused_bias = q.device.type == "cuda"
    if not fused_bias:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)  # (Lq, Lk)
        return fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if torch.is_autocast_enabled(q.device.type):
        # The bias is a tensor subclass that dispatches before autocast would cast: cast here, as autocast would
        # (it leaves float64 alone; under bf16 autocast RoPE leaves q and k in float32 while v is bf16).
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t if t.dtype == torch.float64 else t.to(dtype) for t in (q, k, v))
    if q.shape[1] != k.shape[1] and not _flash_usable(q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (N, H, Lk, D)
    return fn.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk), enable_gqa=True)


def _flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA's CUDA flash kernel takes these inputs (it supports grouped key/value heads; the
    memory-efficient kernel does not)."""
    if q.device.type != "cuda":
        return False
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, True)
        return bool(torch.backends.cuda.can_use_flash_attention(params))
    except (AttributeError, TypeError, RuntimeError):  # another torch: repeating the heads is always correct
        return False


def _layer_forward(layer: DecoderLayer, plan: _Plan, x: torch.Tensor, fam_in: torch.Tensor | None,
                   fresh: torch.Tensor | None, delta: LayerDelta | None,
                   token_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoder layer over all blocks: x (B, T, C) token rows, fam_in (B, F, C) -> (x_out, FAM after the last
    complete block, or None without FAM). `delta`: the layer's FAM-row LoRA (the FAM rows, and where the (B*T,)
    bool token_rows is true the token rows too)."""
    B, T, C = x.shape
    H, Hkv, D = plan.heads, plan.kv_heads, plan.head_dim
    token_delta = None if token_rows is None else delta
    q, k, v, k_raw = layer.self_attn.qkv(layer.input_layernorm(x).reshape(B * T, C), plan.cos, plan.sin,
                                         token_delta, token_rows)
    q, k, v, k_raw = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), k_raw.view(B, T, Hkv, D)
    fam, fam_k, fam_v = None, None, None
    if plan.is_full:
        out = fn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)  # (B, T, H, D)
    else:
        if plan.F:
            fam, fam_k, fam_v = _fam_recurrence(layer, plan, k, v, fam_in, fresh, delta)
        out = _block_attention(plan, q, k, v, k_raw, fam_k, fam_v, fresh)  # (B, T, H, D)
    x_out = layer.finish(x.reshape(B * T, C), out.reshape(B * T, H * D), token_delta, token_rows).view(B, T, C)
    return x_out, fam


def _fam_recurrence(layer: DecoderLayer, plan: _Plan, k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor,
                    fresh: torch.Tensor, delta: LayerDelta | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FAM updates of one layer, block by block. k, v (B, T, Hkv, D) token keys/values; fam (B, F, C) the start
    FAM. Returns the FAM after the last complete block and the FAM_prev keys/values of every block,
    (B, nb, Hkv, F, D) each, for the token pass."""
    B, F, C = fam.shape
    H, Hkv, D, L = plan.heads, plan.kv_heads, plan.head_dim, plan.L
    fam_k, fam_v = [], []
    for i in range(plan.num_blocks):
        qf, kf, vf, _ = layer.self_attn.qkv(layer.input_layernorm(fam).reshape(B * F, C), plan.fam_cos[i],
                                            plan.fam_sin[i], delta)
        kf, vf = kf.view(B, F, Hkv, D), vf.view(B, F, Hkv, D)
        fam_k.append(kf)
        fam_v.append(vf)
        if i < plan.num_complete:  # FAM_prev (queries at b-F..b-1) sees [FAM_prev ; the whole block], nothing else
            b = i * L
            keys = torch.cat([kf, k[:, b:b + L]], dim=1).transpose(1, 2)  # (B, Hkv, F+L, D)
            values = torch.cat([vf, v[:, b:b + L]], dim=1).transpose(1, 2)
            out = _attention(qf.view(B, F, H, D).transpose(1, 2), keys, values)  # (B, H, F, D)
            residual = fam
            if i == 0:  # the very first update of a fresh row uses a zero residual (paper B.1)
                residual = torch.where(fresh[:, None, None], torch.zeros_like(fam), fam)
            fam = layer.finish(residual.reshape(B * F, C), out.transpose(1, 2).reshape(B * F, H * D),
                               delta).view(B, F, C)
    return fam, torch.stack(fam_k, dim=1).transpose(2, 3), torch.stack(fam_v, dim=1).transpose(2, 3)


def _block_attention(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_raw: torch.Tensor,
                     fam_k: torch.Tensor | None, fam_v: torch.Tensor | None,
                     fresh: torch.Tensor | None = None) -> torch.Tensor:
    """Token rows of every block against [sinks | FAM_prev | window], causal in the block (under fam_after_window,
    without FAM_prev in the first M+1 blocks of the rows that start fresh).
    q (B, T, H, D); k, v, k_raw (B, T, Hkv, D); fam_k, fam_v (B, nb, Hkv, F, D) -> (B, T, H, D)."""
    B, T, H, D = q.shape
    Hkv, L, M, S, F, nb = plan.kv_heads, plan.L, plan.M, plan.S, plan.F, plan.num_blocks
    pad = nb * L - T  # a partial last block: padded rows are queries and keys after every real one (never seen)
    q_blocks = fn.pad(q, (0, 0, 0, 0, 0, pad)).view(B, nb, L, H, D).transpose(2, 3)  # (B, nb, H, L, D)
    k_pad = fn.pad(k, (0, 0, 0, 0, 0, pad)).transpose(1, 2)  # (B, Hkv, nb*L, D)
    v_pad = fn.pad(v, (0, 0, 0, 0, 0, pad)).transpose(1, 2)
    outs = []
    for i in range(plan.num_head):  # block i sees [FAM_prev of block i | tokens 0 .. (i+1)*L - 1]
        keys, values = k_pad[:, :, :(i + 1) * L], v_pad[:, :, :(i + 1) * L]  # (B, Hkv, (i+1)*L, D)
        with_fam = without_fam = None
        if F and plan.some_see_fam_early:
            with_fam = _causal_bottom_right(q_blocks[:, i], torch.cat([fam_k[:, i], keys], dim=2),
                                            torch.cat([fam_v[:, i], values], dim=2))
        if not F or plan.some_see_no_fam_early:
            without_fam = _causal_bottom_right(q_blocks[:, i], keys, values)
        if with_fam is not None and without_fam is not None:  # mixed rows under fam_after_window
            outs.append(torch.where(fresh[:, None, None, None], without_fam, with_fam))
        else:
            outs.append(without_fam if with_fam is None else with_fam)
    out = torch.stack(outs, dim=1)  # (B, nh, H, L, D)
    if plan.num_tail:
        nt, W = plan.num_tail, (M + 1) * L
        # Window j of unfold starts at token j*L: the window of block i = j + M; the tail takes j = 1 .. nt.
        keys = [k_pad.unfold(2, W, L)[:, :, 1:].permute(0, 2, 1, 4, 3)]  # (B, nt, Hkv, W, D), a view
        values = [v_pad.unfold(2, W, L)[:, :, 1:].permute(0, 2, 1, 4, 3)]
        if F:
            keys.insert(0, fam_k[:, plan.num_head:])  # (B, nt, Hkv, F, D)
            values.insert(0, fam_v[:, plan.num_head:])
        if S:  # the first S tokens' keys, re-rotated for each tail block's window start
            sinks = k_raw[:, None, :S].expand(B, nt, S, Hkv, D).reshape(B * nt * S, Hkv, D)
            keys.insert(0, rotate(sinks, plan.sink_cos, plan.sink_sin).view(B, nt, S, Hkv, D).transpose(2, 3))
            values.insert(0, v[:, None, :S].expand(B, nt, S, Hkv, D).transpose(2, 3))  # (B, nt, Hkv, S, D)
        keys = torch.cat(keys, dim=3).reshape(B * nt, Hkv, S + F + W, D)
        values = torch.cat(values, dim=3).reshape(B * nt, Hkv, S + F + W, D)
        queries = q_blocks[:, plan.num_head:].reshape(B * nt, H, L, D)
        tail = _causal_bottom_right(queries, keys, values).view(B, nt, H, L, D)
        out = torch.cat([out, tail], dim=1)  # (B, nb, H, L, D)
    return out.transpose(2, 3).reshape(B, nb * L, H, D)[:, :T]  # (B, T, H, D)


def forward_sequence(model: FamModel, fam: FamConfig, token_ids: torch.Tensor | None = None, *,
                     inputs_embeds: torch.Tensor | None = None, fam_prompt: torch.Tensor | None = None,
                     start_fam: torch.Tensor | None = None, fresh: torch.Tensor | None = None,
                     checkpoint: bool = False) -> SequenceOutput:
    """Run whole sequences through `model` under the attention config `fam` (which need not be the model's own).

    token_ids (B, T) int64, or inputs_embeds (B, T, C). FAM start (fam mode): `start_fam` (N, B, F, C) or
    (N, F, C) with `fresh` (B,) bool, True where that row's start is FAM_0 (default: all False, a continuation);
    without `start_fam`, every row starts fresh from FAM_0 = model.initial_fam(fam_prompt or the default prompt),
    with gradients to the prompt. checkpoint=True recomputes each layer in the backward pass (activation memory:
    one layer's work plus N x (B, T, C))."""
    x = model.model.embed_tokens(token_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"token_ids: expected a (B, T) batch with T >= 1, got shape {tuple(x.shape[:-1])}")
    B, T, C = x.shape
    plan = _Plan(model, fam, B, T, x.device, x.dtype)
    layers = model.model.layers
    if plan.F:
        if start_fam is None:
            prompt = default_fam_prompt(model, plan.F) if fam_prompt is None else fam_prompt
            start_fam, fresh = model.initial_fam(prompt.to(x.dtype)), torch.ones(B, dtype=torch.bool, device=x.device)
        if start_fam.dim() == 3:
            start_fam = start_fam[:, None].expand(-1, B, -1, -1)  # (N, B, F, C)
        if tuple(start_fam.shape) != (len(layers), B, plan.F, C):
            raise ValueError(f"start_fam: expected shape {(len(layers), B, plan.F, C)}, got {tuple(start_fam.shape)}")
        fresh = torch.zeros(B, dtype=torch.bool, device=x.device) if fresh is None else fresh.to(x.device)
    # Python bools, asked of the device once per pass: under fam_after_window only continuing rows see it early.
    plan.some_see_fam_early = bool(plan.F) and not (plan.gated and bool(fresh.all()))
    plan.some_see_no_fam_early = bool(plan.F) and plan.gated and bool(fresh.any())
    token_rows = None  # tokens taking the FAM LoRA: past a fresh row's first M+1 blocks, and all of a continuing row
    if plan.F and plan.gated and model.lora_after_window:
        late = torch.arange(T, device=x.device) // plan.L > plan.M
        token_rows = (~fresh[:, None] | late[None, :]).reshape(B * T)
    fams = []
    for l, layer in enumerate(layers):
        fam_in, delta = (start_fam[l], model.fam_delta(l)) if plan.F else (None, None)
        if checkpoint and torch.is_grad_enabled():
            x, fam_out = activation_checkpoint(_layer_forward, layer, plan, x, fam_in, fresh, delta, token_rows,
                                               use_reentrant=False)
        else:
            x, fam_out = _layer_forward(layer, plan, x, fam_in, fresh, delta, token_rows)
        fams.append(fam_out)
    return SequenceOutput(x, torch.stack(fams) if plan.F else None, plan.num_complete if plan.F else 0)


def sequence_logits(model: FamModel, fam: FamConfig, token_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, T, V) logits of every position (convenient for tests and short sequences; training takes the hidden
    rows of the labelled positions only, see masked_loss)."""
    return model.logits(forward_sequence(model, fam, token_ids, **kwargs).hidden)


@dataclass
class LossTerms:
    """What masked_loss measured over the labelled positions of a batch."""

    loss: torch.Tensor  # what training minimises: cross_entropy, or (1 - w) * cross_entropy + w * kl with a teacher
    cross_entropy: torch.Tensor  # mean over the labelled positions
    kl: torch.Tensor | None  # mean KL(teacher || model) there; None without a teacher
    predictions: torch.Tensor  # (n,) the argmax there


def masked_loss(model: FamModel, hidden: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024,
                teacher_hidden: torch.Tensor | None = None, distill_weight: float = 0.0) -> LossTerms:
    """Mean cross-entropy over the labelled positions (labels != -100) of hidden (B, T, C), and the argmax
    predictions there. Logits are formed only for labelled rows, `chunk_rows` at a time under activation
    checkpointing, so a long text sequence never holds (B, T, V) logits (with their gradient) at once.

    With `teacher_hidden` (B, T, C), the last-layer rows of a teacher reading the same tokens (no gradient), the
    loss mixes in distillation: (1 - w) * cross-entropy + w * KL(teacher || model), w = distill_weight, the
    teacher's whole next-token distribution as a soft target on every labelled position."""
    keep = labels != -100  # (B, T)
    rows, targets = hidden[keep], labels[keep]  # (n, C), (n,)
    if targets.numel() == 0:
        raise ValueError("labels: no labelled position in the batch")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight: must be in 0..1, got {distill_weight}")
    teacher_rows = None if teacher_hidden is None else teacher_hidden[keep].detach()  # (n, C)

    def chunk_terms(h: torch.Tensor, t: torch.Tensor, th: torch.Tensor | None):
        logits = model.logits(h)  # (rows, V)
        ce = fn.cross_entropy(logits, t, reduction="sum")
        if th is None:
            return ce, ce.new_zeros(()), logits.argmax(-1)
        with torch.no_grad():
            teacher_logp = fn.log_softmax(model.logits(th), dim=-1)
        kl = fn.kl_div(fn.log_softmax(logits, dim=-1), teacher_logp, log_target=True, reduction="sum")
        return ce, kl, logits.argmax(-1)

    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kl_total, predictions = ce_total.clone(), []
    for i in range(0, targets.numel(), chunk_rows):
        h, t = rows[i:i + chunk_rows], targets[i:i + chunk_rows]
        th = None if teacher_rows is None else teacher_rows[i:i + chunk_rows]
        if torch.is_grad_enabled() and targets.numel() > chunk_rows:
            ce, kl, pred = activation_checkpoint(chunk_terms, h, t, th, use_reentrant=False)
        else:
            ce, kl, pred = chunk_terms(h, t, th)
        ce_total, kl_total = ce_total + ce, kl_total + kl
        predictions.append(pred)
    ce_mean = ce_total / targets.numel()
    if teacher_rows is None:
        return LossTerms(ce_mean, ce_mean, None, torch.cat(predictions))
    kl_mean = kl_total / targets.numel()
    return LossTerms((1 - distill_weight) * ce_mean + distill_weight * kl_mean, ce_mean, kl_mean,
                     torch.cat(predictions))
