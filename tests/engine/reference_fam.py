"""A slow, deliberately simple reference implementation of TransformerFAM (FAM-SPEC.md, Algorithm 2 of
Hwang et al. 2024, plus the engine's attention sinks), for tests only.

It is written independently of engine/model.py and engine/state.py. It processes the whole token sequence at
once, layer by layer, and for every single query it builds the explicit list of keys/values that query may see.
Everything is computed in float64. Speed is not a goal; being obviously right is.

Semantics (FAM-SPEC.md plus the engine rules):

* ``full``: plain causal attention over all tokens at their absolute positions (no blocks, no sinks, no FAM).
* ``bswa`` (F = 0) and ``fam`` (F = fam.fam_length): tokens are cut into blocks of L tokens; block tau (1-based)
  covers positions b .. b+L-1 with b = (tau-1)*L (the last block may be partial). A token query at position t in
  block tau sees, in this order:
    1. sinks: when S > 0 and the window start w = b - M*L is > 0 (block 1 has left the window), the first S
       tokens' keys/values of this layer, their keys RoPE-rotated at positions w-S .. w-1 (values unchanged);
    2. memory: every token of blocks tau-M .. tau-1 that exists (positions max(w, 0) .. b-1), absolute positions;
    3. FAM (fam mode only): all F rows of FAM_prev[l], keys at positions b-F .. b-1;
    4. its own block up to and including itself (positions b .. t), absolute positions.
  Queries always sit at their absolute position t.
* FAM update (fam mode, F > 0, only for COMPLETE blocks): the F rows of FAM_prev[l] are queries at positions
  b-F .. b-1 that see [FAM_prev[l] keys (all F, no mask), the whole block's keys]; no memory, no sinks.
  FAM_new[l] = R + A + MLP(post_norm(R + A)) with A = o_proj(attention), R = FAM_prev[l] -- except for the
  first update (block 1) where R = 0. FAM_new[l] is used by block tau+1 in the same layer l.
* FAM_0[l]: the FAM prompt P (F x C, embedding level; default: the mean row of embed_tokens repeated F times)
  run through the decoder layers as a standalone sequence of F rows at positions -F .. -1 with full
  bidirectional attention among them; FAM_0[l] is the hidden state entering layer l (FAM_0[0] = P).
* Logits: model.norm then lm_head (embed_tokens when the embeddings are tied) on the token rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from famserve.engine.config import FamConfig, ModelConfig

DTYPE = torch.float64


@dataclass
class ReferenceResult:
    """Everything the reference computes for one token sequence (float64)."""

    logits: torch.Tensor  # (T, V)
    fam0: list[torch.Tensor]  # per layer, (F, C): the initial FAM (empty list unless fam mode with F > 0)
    fam_final: list[torch.Tensor]  # per layer, (F, C): the FAM after the last COMPLETE block (fam0 if none)
    # fam_history[k][l]: the FAM_prev that block k+1 (0-based k) attends to in layer l (empty lists unless F > 0)
    fam_history: list[list[torch.Tensor]]


# --------------------------------------------------------------------------------------------------------------
# Small building blocks of the Llama decoder layer.
# --------------------------------------------------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x @ W^T (+ bias when the checkpoint has one under name.bias)."""
    y = x @ weights[name + ".weight"].T
    bias = weights.get(name + ".bias")
    if bias is not None:
        y = y + bias
    return y


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF 'rotate_half' RoPE. x: (heads, n, D); positions: (n,) integers (may be negative)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=DTYPE) / d)  # (D/2,)
    angles = positions.to(DTYPE)[:, None] * inv_freq[None, :]  # (n, D/2)
    emb = torch.cat([angles, angles], dim=-1)  # (n, D)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated_half * sin


class _Layer:
    """One decoder layer, read from the HF-named weights; every method takes raw hidden rows (n, C)."""

    def __init__(self, weights: dict[str, torch.Tensor], config: ModelConfig, index: int):
        self.w = weights
        self.cfg = config
        self.p = f"model.layers.{index}."

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.w[self.p + "input_layernorm.weight"], self.cfg.rms_norm_eps)

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, C) -> (H, n, D), rotated at the given positions."""
        n = x.shape[0]
        q = _linear(self._normed(x), self.w, self.p + "self_attn.q_proj")
        q = q.view(n, self.cfg.num_heads, self.cfg.head_dim).transpose(0, 1)
        return _rope(q, positions, self.cfg.rope_theta)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C) -> K (Hkv, n, D) rotated at the given positions, V (Hkv, n, D) unrotated."""
        n = x.shape[0]
        normed = self._normed(x)
        k = _linear(normed, self.w, self.p + "self_attn.k_proj")
        v = _linear(normed, self.w, self.p + "self_attn.v_proj")
        k = k.view(n, self.cfg.num_kv_heads, self.cfg.head_dim).transpose(0, 1)
        v = v.view(n, self.cfg.num_kv_heads, self.cfg.head_dim).transpose(0, 1)
        return _rope(k, positions, self.cfg.rope_theta), v

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query (H, D) over an explicit key/value list (Hkv, m, D) -> o_proj output (C,)."""
        heads, kv_heads, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        group = heads // kv_heads  # kv head j serves query heads j*group .. (j+1)*group-1
        out = []
        for h in range(heads):
            j = h // group
            scores = (k[j] @ q[h]) / math.sqrt(d)  # (m,)
            probs = torch.softmax(scores, dim=0)
            out.append(probs @ v[j])  # (D,)
        return _linear(torch.cat(out), self.w, self.p + "self_attn.o_proj")

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        """h + down(silu(gate(n)) * up(n)) with n = post_attention_layernorm(h)."""
        n = _rms_norm(h, self.w[self.p + "post_attention_layernorm.weight"], self.cfg.rms_norm_eps)
        inner = torch.nn.functional.silu(_linear(n, self.w, self.p + "mlp.gate_proj")) * _linear(
            n, self.w, self.p + "mlp.up_proj")
        return h + _linear(inner, self.w, self.p + "mlp.down_proj")


def _positions(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------------------------

def _prepare_weights(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    w = {name: t.detach().to("cpu", DTYPE) for name, t in weights.items() if torch.is_floating_point(t)}
    if config.tie_word_embeddings or "lm_head.weight" not in w:
        if not config.tie_word_embeddings:
            raise ValueError("lm_head.weight is missing and tie_word_embeddings is False")
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
    if config.attention_bias:
        for i in range(config.num_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                if f"model.layers.{i}.self_attn.{proj}.bias" not in w:
                    raise ValueError(f"attention_bias is set but model.layers.{i}.self_attn.{proj}.bias is missing")
    return w


def _initial_fam(w: dict[str, torch.Tensor], config: ModelConfig, prompt: torch.Tensor) -> list[torch.Tensor]:
    """FAM_0[l] for every layer: P through the layers, F rows at positions -F..-1, full bidirectional attention."""
    f = prompt.shape[0]
    positions = _positions(-f, 0)
    x = prompt
    fam0 = []
    for i in range(config.num_layers):
        fam0.append(x)
        layer = _Layer(w, config, i)
        q = layer.queries(x, positions)
        k, v = layer.keys_values(x, positions)
        attn = torch.stack([layer.attend_one(q[:, r], k, v) for r in range(f)])  # every row sees all F rows
        x = layer.mlp_block(x + attn)
    return fam0


def reference_run(weights: dict[str, torch.Tensor], config: ModelConfig, fam: FamConfig,
                  tokens: torch.Tensor, fam_prompt: torch.Tensor | None = None) -> ReferenceResult:
    """Run the reference model over a whole token sequence; see the module docstring for the semantics."""
    if config.rope_scaling is not None:
        raise ValueError("reference_fam covers plain RoPE only (rope_scaling must be None)")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tuple(tokens.shape)}")
    w = _prepare_weights(weights, config)
    T = tokens.numel()
    C = config.hidden_size

    mode = fam.mode
    L = fam.block_size
    M = fam.memory_blocks
    F = fam.fam_length if mode == "fam" else 0
    S = fam.sink_tokens if mode != "full" else 0

    # Initial FAM.
    fam0: list[torch.Tensor] = []
    if F > 0:
        if fam_prompt is None:
            prompt = w["model.embed_tokens.weight"].mean(dim=0, keepdim=True).repeat(F, 1)
        else:
            prompt = fam_prompt.detach().to("cpu", DTYPE)
            if tuple(prompt.shape) != (F, C):
                raise ValueError(f"fam_prompt must have shape ({F}, {C}), got {tuple(prompt.shape)}")
        fam0 = _initial_fam(w, config, prompt)

    num_blocks = -(-T // L)
    x = w["model.embed_tokens.weight"][tokens]  # (T, C): the input of layer 0
    all_positions = _positions(0, T)
    fam_history: list[list[torch.Tensor]] = [[] for _ in range(num_blocks)]
    fam_final: list[torch.Tensor] = []

    for i in range(config.num_layers):
        layer = _Layer(w, config, i)
        q_tok = layer.queries(x, all_positions)  # (H, T, D), each token at its absolute position
        k_tok, v_tok = layer.keys_values(x, all_positions)  # (Hkv, T, D), each token at its absolute position
        attn = torch.zeros(T, C, dtype=DTYPE)

        if mode == "full":
            for t in range(T):
                attn[t] = layer.attend_one(q_tok[:, t], k_tok[:, : t + 1], v_tok[:, : t + 1])
        else:
            fam_prev = fam0[i] if F > 0 else None
            for blk in range(num_blocks):  # blk = tau - 1
                b = blk * L
                e = min(b + L, T)
                w_start = b - M * L
                if F > 0:
                    fam_history[blk].append(fam_prev)

                # Keys/values of the prefix that every token query in this block sees before its own block.
                prefix_k: list[torch.Tensor] = []
                prefix_v: list[torch.Tensor] = []
                if S > 0 and w_start > 0:  # sinks, re-positioned just before the window
                    k_s, v_s = layer.keys_values(x[:S], _positions(w_start - S, w_start))
                    prefix_k.append(k_s)
                    prefix_v.append(v_s)
                mem_lo = max(w_start, 0)  # memory: blocks tau-M .. tau-1
                prefix_k.append(k_tok[:, mem_lo:b])
                prefix_v.append(v_tok[:, mem_lo:b])
                if F > 0:  # FAM_prev at positions b-F .. b-1
                    k_f, v_f = layer.keys_values(fam_prev, _positions(b - F, b))
                    prefix_k.append(k_f)
                    prefix_v.append(v_f)

                for t in range(b, e):  # token queries: prefix + own block causally
                    k = torch.cat(prefix_k + [k_tok[:, b: t + 1]], dim=1)
                    v = torch.cat(prefix_v + [v_tok[:, b: t + 1]], dim=1)
                    attn[t] = layer.attend_one(q_tok[:, t], k, v)

                if F > 0 and e - b == L:  # FAM update, complete blocks only
                    fam_pos = _positions(b - F, b)
                    q_f = layer.queries(fam_prev, fam_pos)
                    k_f, v_f = layer.keys_values(fam_prev, fam_pos)
                    k = torch.cat([k_f, k_tok[:, b:e]], dim=1)  # FAM_prev (all F) + the WHOLE block
                    v = torch.cat([v_f, v_tok[:, b:e]], dim=1)
                    fam_attn = torch.stack([layer.attend_one(q_f[:, r], k, v) for r in range(F)])
                    residual = torch.zeros_like(fam_prev) if blk == 0 else fam_prev
                    fam_prev = layer.mlp_block(residual + fam_attn)
            if F > 0:
                fam_final.append(fam_prev)

        x = layer.mlp_block(x + attn)

    hidden = _rms_norm(x, w["model.norm.weight"], config.rms_norm_eps)
    logits = hidden @ w["lm_head.weight"].T
    return ReferenceResult(logits=logits, fam0=fam0, fam_final=fam_final, fam_history=fam_history)


def reference_logits(weights: dict[str, torch.Tensor], config: ModelConfig, fam: FamConfig,
                     tokens: torch.Tensor, fam_prompt: torch.Tensor | None = None) -> torch.Tensor:
    """(T, V) float64 logits of every token of ``tokens`` (1-D), computed all at once; see the module docstring."""
    return reference_run(weights, config, fam, tokens, fam_prompt).logits
