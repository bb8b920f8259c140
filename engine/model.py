"""The Llama-family decoder with TransformerFAM attention (Hwang et al., "TransformerFAM: Feedback attention is
working memory", arXiv 2404.09173, Algorithm 2), computed as a stream: tokens of the block being filled attend to
[sinks | FAM_prev | M memory blocks | the block so far]; when a block completes, each layer's FAM rows attend to
[FAM_prev | the whole block] and become the next FAM (see docs/engine.md and FAM-SPEC.md).

Dimensions: B streams in a step, T tokens of one stream in a step, C hidden size, H query heads, Hkv key/value
heads, D head dim, N layers, L block size, M memory blocks, F FAM rows, S sink tokens, K key slots per layer
(S + F + R*L, R = ring blocks), V vocabulary. Module names equal HF's so checkpoints load by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as fn
from torch import nn

from .config import FamConfig, ModelConfig
from .errors import ContextLengthError
from .fam_lora import FamLoRA, LayerDelta
from .rope import Rotary, rotate
from .state import EMPTY, FamState, StateLayout, allocate


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least float32 (as HF does), but keep float64 exact for the reference tests.
        xf = x if x.dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """The projections of one attention layer (the attention itself runs in FamModel, which owns the state)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, delta: LayerDelta | None = None,
            delta_from: int | torch.Tensor = 0):
        """x (T, C) normed -> q (T, H, D) and k (T, Hkv, D) rotated, v (T, Hkv, D), and the unrotated k.
        `delta`: the layer's FAM-row LoRA (fam_lora.py), applied to rows delta_from.. of x (the FAM rows), or to
        the rows where a bool tensor delta_from is true (LayerDelta.project)."""
        t = x.shape[0]
        q = _project(self.q_proj, "q_proj", x, delta, delta_from).view(t, self.num_heads, self.head_dim)
        k_raw, v = self._kv_raw(x, delta, delta_from)
        return rotate(q, cos, sin), rotate(k_raw, cos, sin), v, k_raw

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, delta: LayerDelta | None = None):
        """x (T, C) normed FAM rows -> their k (T, Hkv, D) rotated and v: keys only, no queries needed."""
        k_raw, v = self._kv_raw(x, delta, 0)
        return rotate(k_raw, cos, sin), v

    def _kv_raw(self, x: torch.Tensor, delta: LayerDelta | None, delta_from: int | torch.Tensor):
        t = x.shape[0]
        k_raw = _project(self.k_proj, "k_proj", x, delta, delta_from).view(t, self.num_kv_heads, self.head_dim)
        v = _project(self.v_proj, "v_proj", x, delta, delta_from).view(t, self.num_kv_heads, self.head_dim)
        return k_raw, v


def _project(linear: nn.Linear, name: str, x: torch.Tensor, delta: LayerDelta | None,
             delta_from: int | torch.Tensor = 0):
    return linear(x) if delta is None else delta.project(name, linear, x, delta_from)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, delta: LayerDelta | None = None,
                delta_from: int | torch.Tensor = 0) -> torch.Tensor:
        gate = _project(self.gate_proj, "gate_proj", x, delta, delta_from)
        hidden = fn.silu(gate) * _project(self.up_proj, "up_proj", x, delta, delta_from)
        return _project(self.down_proj, "down_proj", hidden, delta, delta_from)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def finish(self, residual: torch.Tensor, attn: torch.Tensor, delta: LayerDelta | None = None,
               delta_from: int | torch.Tensor = 0) -> torch.Tensor:
        """attn (T, H*D) attention output -> the layer's output rows, given the attention residual (`delta`: as
        in Attention.qkv)."""
        h = residual + _project(self.self_attn.o_proj, "o_proj", attn, delta, delta_from)
        return h + self.mlp(self.post_attention_layernorm(h), delta, delta_from)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (T, H, D); k, v (Hkv, K, D); mask (T, K) bool or None -> (T, H*D)."""
    t, h, d = q.shape
    out = fn.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],
                                          attn_mask=None if mask is None else mask[None, None],
                                          enable_gqa=True)  # (1, H, T, D)
    return out[0].transpose(0, 1).reshape(t, h * d)


@dataclass
class StepPiece:
    """Tokens of one stream processed in one step; they never cross that stream's block boundary."""

    state: FamState
    token_ids: torch.Tensor  # (T,) int64


@dataclass
class BlockIndices:
    """Where one whole block of a stream goes (FamModel.fill_block), as device tensors: all that changes from one
    block to the next, so that a CUDA graph of fill_block replays for any later block once these are copied in."""

    token: torch.Tensor  # (L,) the block's tokens
    pos: torch.Tensor  # (L,) their positions
    slots: torch.Tensor  # (L,) their ring slots
    fam_pos: torch.Tensor  # (F,) the FAM queries' positions: the F before the block, where FAM_prev's keys sit
    next_slots: torch.Tensor  # (L,) the next block's ring slots, freed
    sink_pos: torch.Tensor  # (S,) where the sinks sit for the next block

    def copy_(self, other: BlockIndices) -> None:
        for name in ("token", "pos", "slots", "fam_pos", "next_slots", "sink_pos"):
            getattr(self, name).copy_(getattr(other, name))


class FamModel(nn.Module):
    """A Llama-family decoder that advances FamStates. `step` runs the tokens of many streams at once (dense layers
    batched over all their rows, attention per stream against its own slots); a stream whose block fills up in a step
    gets its FAM update in the same pass, and its window moves on."""

    def __init__(self, cfg: ModelConfig, fam: FamConfig):
        super().__init__()
        self.config, self.fam_config = cfg, fam
        self.layout = StateLayout.from_configs(cfg, fam)
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self._blank: FamState | None = None  # a fresh stream's state (holds FAM_0), built once
        self.fam_lora: FamLoRA | None = None  # deltas for the FAM rows only (an adapter's), see set_fam_lora
        self.lora_after_window = False  # fam_lora also applies to the tokens of streams past their window

    # --- weights ------------------------------------------------------------------------------------------------

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, C) last-layer rows -> (T, V) logits, float32 (or float64 for a float64 model)."""
        normed, weight = self.model.norm(hidden), self.output_weight()
        if normed.shape[0] == 1 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            # one row (a decode step): torch's bfloat16 matrix-vector product reads the (V, C) output weights, the
            # largest read of the step, 1.5-2.5x faster than linear does (measured on a Xeon with AMX)
            out = torch.mv(weight, normed[0])[None]
        else:
            out = fn.linear(normed, weight)
        return out if out.dtype == torch.float64 else out.float()

    def to_device(self, device: torch.device | str, dtype: torch.dtype) -> "FamModel":
        self.to(device=device, dtype=dtype)
        self.rotary = Rotary(self.config, device)
        self._blank = None
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # --- FAM_0 ---------------------------------------------------------------------------------------------------

    def default_fam_prompt(self) -> torch.Tensor:
        """(F, C) the FAM prompt used without a trained adapter: the mean token embedding in every row (the least
        harmful of the defaults measured in FAM-SPEC.md)."""
        mean = self.model.embed_tokens.weight.mean(dim=0)
        return mean.expand(self.layout.num_fam, -1).clone()

    def initial_fam(self, prompt: torch.Tensor) -> torch.Tensor:
        """FAM_0 (N, F, C): the prompt P propagated through the layers as its own sequence, full attention among
        its F rows at positions -F..-1; FAM_0[l] is the hidden state entering layer l."""
        f = prompt.shape[0]
        cos, sin = self.rotary.cos_sin(torch.arange(-f, 0), prompt.dtype)
        x, per_layer = prompt, []
        for l, layer in enumerate(self.model.layers):
            per_layer.append(x)
            delta = self.fam_delta(l)
            q, k, v, _ = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin, delta)
            x = layer.finish(x, attend(q, k.transpose(0, 1), v.transpose(0, 1), None), delta)
        return torch.stack(per_layer)  # (N, F, C)

    def set_fam_prompt(self, prompt: torch.Tensor | None) -> None:
        """Use a trained FAM prompt (F, C), or the default when None; fresh states start from its FAM_0."""
        self._fam_prompt = prompt
        self._blank = None

    def set_fam_lora(self, fam_lora: FamLoRA | None, after_window: bool = False) -> None:
        """Use these FAM-row deltas (on the model's device and dtype) from the next fresh state on; after_window:
        the tokens of a stream take them too once a block has left its window (an adapter's every-row LoRA under
        FamConfig.fam_after_window, which cannot be merged into weights the window's tokens must keep)."""
        self.fam_lora = None if fam_lora is None else fam_lora.to(device=self.device, dtype=self.dtype)
        self.lora_after_window = after_window and fam_lora is not None
        self._blank = None

    def fam_delta(self, layer: int) -> LayerDelta | None:
        """The FAM-row LoRA of one layer, or None (the FAM rows then use the base weights)."""
        return None if self.fam_lora is None else self.fam_lora.layers[layer]

    def fam_visible(self, block: int) -> bool:
        """Whether the tokens of 0-based block `block` read the FAM: always, unless FamConfig.fam_after_window
        holds them off until a block has left the window (block > M)."""
        return not self.fam_config.gates_fam or block > self.layout.memory_blocks

    def _delta_rows(self, plans: list["_PiecePlan"], num_fam_rows: int) -> int | torch.Tensor | None:
        """Which rows of a step (the pieces' tokens, then num_fam_rows FAM rows) take the FAM LoRA, in
        LayerDelta.project's terms; None when none does."""
        if self.fam_lora is None:
            return None
        lay = self.layout
        late = [self.lora_after_window and self.fam_visible(p.start // lay.block_size) for p in plans]
        if all(late):
            return 0
        n_tok = sum(p.size for p in plans)
        if not any(late):
            return n_tok if num_fam_rows else None
        flags = [flag for p, flag in zip(plans, late) for _ in range(p.size)] + [True] * num_fam_rows
        return torch.tensor(flags, device=self.device)

    # --- states --------------------------------------------------------------------------------------------------

    def new_state(self) -> FamState:
        """A fresh stream: every slot empty except the FAM_0 rows (at positions -F..-1)."""
        return self._blank_state().clone()

    def reset_state(self, state: FamState) -> None:
        """Make a used state fresh again, reusing its buffers (no allocation, no page faults)."""
        state.copy_(self._blank_state())

    @property
    def state_nbytes(self) -> int:
        """Bytes of one stream's state: the same for every stream of this model and config, forever."""
        return self._blank_state().nbytes

    @torch.no_grad()
    def _blank_state(self) -> FamState:
        if self._blank is None:
            blank = allocate(self.layout, self.device, self.dtype)
            if self.layout.num_fam:
                prompt = getattr(self, "_fam_prompt", None)
                prompt = self.default_fam_prompt() if prompt is None else prompt.to(self.device, self.dtype)
                blank.fam.copy_(self.initial_fam(prompt))
                self._write_fam_keys(blank)
            self._blank = blank
        return self._blank

    def _write_fam_keys(self, state: FamState) -> None:
        """Project each layer's FAM rows to keys/values at positions b-F..b-1 of the block about to start."""
        lay, b = self.layout, state.block_start
        pos = torch.arange(b - lay.num_fam, b, device=self.device)
        cos, sin = self.rotary.cos_sin(pos, self.dtype)
        for l, layer in enumerate(self.model.layers):
            k, v = layer.self_attn.kv(layer.input_layernorm(state.fam[l]), cos, sin, self.fam_delta(l))
            state.k[l, :, lay.num_sinks:lay.ring_start] = k.transpose(0, 1)
            state.v[l, :, lay.num_sinks:lay.ring_start] = v.transpose(0, 1)
        state.key_pos[lay.num_sinks:lay.ring_start] = pos if self.fam_visible(b // lay.block_size) else EMPTY

    # --- the streaming step --------------------------------------------------------------------------------------

    def step(self, pieces: list[StepPiece], all_logits: bool = False) -> list[torch.Tensor]:
        """Run each piece's tokens through the network, writing their keys/values into its state. A piece that
        fills its stream's block completes the block in the same pass: at every layer the stream's FAM rows
        (FAM_prev of that layer) join the token rows in the dense layers, attend to [FAM_prev | the whole block] and
        become the next FAM, whose keys for the next block are projected right away. (As passes of their own, the
        FAM update and the key projection doubled a step's kernel launches, which is what a GPU step costs.)
        Returns per piece the logits (T, V) of every token if all_logits, else of its last token (1, V)."""
        lay = self.layout
        plans = [self._plan(piece) for piece in pieces]
        n_tok = sum(p.size for p in plans)
        closing = [p for p in plans if p.fam_pos is not None]  # pieces whose FAM update rides in this pass
        cos, sin = self.rotary.cos_sin(torch.cat([p.pos for p in plans] + [p.fam_pos for p in closing]), self.dtype)
        if closing:
            next_cos, next_sin = self.rotary.cos_sin(torch.cat([p.fam_pos for p in closing]) + lay.block_size,
                                                     self.dtype)
        x = self.model.embed_tokens(torch.cat([p.token_ids for p in pieces]).to(self.device))  # (sum T, C)
        delta_rows = self._delta_rows(plans, len(closing) * lay.num_fam)
        for l, layer in enumerate(self.model.layers):
            delta = None if delta_rows is None else self.fam_delta(l)
            fam = [p.state.fam[l] for p in closing]  # FAM_prev rows entering this layer, (F, C) each
            h = torch.cat([x, *fam]) if closing else x
            q, k, v, k_raw = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin, delta, delta_rows)
            outs, fam_outs, row, fam_row = [], [], 0, n_tok
            for p in plans:
                st, t = p.state, p.size
                st.k[l, :, p.slot:p.slot + t] = k[row:row + t].transpose(0, 1)
                st.v[l, :, p.slot:p.slot + t] = v[row:row + t].transpose(0, 1)
                if p.start < lay.num_sinks:  # a Python int: testing a device tensor here would sync every layer
                    self._keep_sinks(st, l, p.start, k_raw[row:row + t], v[row:row + t])
                queries = q[row:row + t]
                if p.fam_pos is not None:
                    queries = torch.cat([queries, q[fam_row:fam_row + lay.num_fam]])
                    fam_row += lay.num_fam
                used = p.mask.shape[1]
                out = attend(queries, st.k[l, :, :used], st.v[l, :, :used], p.mask)
                outs.append(out[:t])
                fam_outs.append(out[t:])
                row += t
            if not closing:
                x = layer.finish(x, torch.cat(outs), delta, delta_rows)
                continue
            # The first update's residual is zeros: FAM_0 carries no context (paper B.1).
            residual = [torch.zeros_like(f) if p.state.num_fam_updates == 0 else f for p, f in zip(closing, fam)]
            out = layer.finish(torch.cat([x, *residual]), torch.cat(outs + fam_outs), delta, delta_rows)
            x, new_fam = out[:n_tok], out[n_tok:]
            fam_k, fam_v = layer.self_attn.kv(layer.input_layernorm(new_fam), next_cos, next_sin, delta)
            for j, p in enumerate(closing):
                rows = slice(j * lay.num_fam, (j + 1) * lay.num_fam)
                p.state.fam[l] = new_fam[rows]
                p.state.k[l, :, lay.num_sinks:lay.ring_start] = fam_k[rows].transpose(0, 1)
                p.state.v[l, :, lay.num_sinks:lay.ring_start] = fam_v[rows].transpose(0, 1)
        for p in plans:
            p.state.num_tokens += p.size
            if p.fam_pos is not None:
                visible = self.fam_visible(p.state.num_tokens // lay.block_size)  # of the next block's tokens
                p.state.key_pos[lay.num_sinks:lay.ring_start] = p.fam_pos + lay.block_size if visible else EMPTY
                p.state.num_fam_updates += 1
            if p.state.num_tokens % lay.block_size == 0:
                self._start_next_block(p.state)
        out, row = [], 0
        for p in plans:
            rows = x[row:row + p.size] if all_logits else x[row + p.size - 1:row + p.size]
            out.append(self.logits(rows))
            row += p.size
        return out

    def decode_tokens(self, states: list[FamState], token: torch.Tensor, pos: torch.Tensor,
                      slot: torch.Tensor) -> torch.Tensor:
        """One token for each of B streams, as `step` computes them, with every index a device tensor and every
        shape fixed (attention over all K slots, the unwritten ones masked), so the whole call can be captured once
        as a CUDA graph and replayed for every later token (cuda_graphs.py). token, pos, slot: (B,) int64 on the
        device: each stream's token, its position, its ring slot. Only for tokens that do not fill their block,
        past the sinks, in FAM or BSWA streams (fits_decode_tokens). Does not count the tokens (num_tokens): the
        caller does. Returns (B, V)."""
        masks = []
        for b, st in enumerate(states):
            st.key_pos.index_copy_(0, slot[b:b + 1], pos[b:b + 1])
            masks.append(st.key_pos[None, :] <= pos[b:b + 1, None])  # (1, K)
        rows = None  # the streams past their window, whose tokens take the LoRA: those whose FAM slots are visible
        if self.lora_after_window:
            first_fam = self.layout.num_sinks
            rows = torch.cat([st.key_pos[first_fam:first_fam + 1] < EMPTY for st in states])
        cos, sin = self.rotary.cos_sin(pos, self.dtype)
        x = self.model.embed_tokens(token)  # (B, C)
        for l, layer in enumerate(self.model.layers):
            delta = None if rows is None else self.fam_delta(l)
            q, k, v, _ = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin, delta, rows)
            outs = []
            for b, st in enumerate(states):
                st.k[l].index_copy_(1, slot[b:b + 1], k[b:b + 1].transpose(0, 1))
                st.v[l].index_copy_(1, slot[b:b + 1], v[b:b + 1].transpose(0, 1))
                outs.append(attend(q[b:b + 1], st.k[l], st.v[l], masks[b]))
            x = layer.finish(x, torch.cat(outs), delta, rows)
        return self.logits(x)

    def fits_decode_tokens(self, state: FamState) -> bool:
        """Whether the stream's next single token may go through decode_tokens."""
        lay = self.layout
        return (self.fam_config.mode != "full" and state.num_tokens >= lay.num_sinks
                and state.num_tokens % lay.block_size + 1 < lay.block_size)

    def fill_block(self, state: FamState, idx: BlockIndices) -> torch.Tensor:
        """One whole block of one stream, from a block boundary past the first max(1, M) blocks, as `step` reads it
        (with the FAM update riding along) and then the move to the next block, with every index a device tensor
        (BlockIndices) and every shape fixed, so that a CUDA graph captured once replays it for every later block of
        the stream (cuda_graphs.py). Does not count the tokens or the FAM update: the caller does. Returns the
        block's last logits (1, V)."""
        lay = self.layout
        size, fam, sinks = lay.block_size, lay.num_fam, lay.num_sinks
        state.key_pos.index_copy_(0, idx.slots, idx.pos)
        mask = state.key_pos[None, :] <= idx.pos[:, None]  # (L, K)
        positions = idx.pos
        if fam:  # the FAM queries see FAM_prev's slots and the whole block
            seen = torch.zeros(lay.num_slots, dtype=torch.bool, device=self.device).index_fill_(0, idx.slots, True)
            seen[sinks:lay.ring_start] = True
            mask = torch.cat([mask, seen.expand(fam, -1)])
            positions = torch.cat([idx.pos, idx.fam_pos])
            next_cos, next_sin = self.rotary.cos_sin(idx.fam_pos + size, self.dtype)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        x = self.model.embed_tokens(idx.token)  # (L, C)
        rows = 0 if self.lora_after_window else size  # fits_fill_block: past the window, if the LoRA waits for it
        for l, layer in enumerate(self.model.layers):
            delta = self.fam_delta(l) if fam else None
            h = torch.cat([x, state.fam[l]]) if fam else x
            q, k, v, _ = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin, delta, rows)
            state.k[l].index_copy_(1, idx.slots, k[:size].transpose(0, 1))
            state.v[l].index_copy_(1, idx.slots, v[:size].transpose(0, 1))
            h = layer.finish(h, attend(q, state.k[l], state.v[l], mask), delta, rows)
            x = h[:size]
            if fam:
                fam_k, fam_v = layer.self_attn.kv(layer.input_layernorm(h[size:]), next_cos, next_sin, delta)
                state.fam[l].copy_(h[size:])
                state.k[l, :, sinks:lay.ring_start] = fam_k.transpose(0, 1)
                state.v[l, :, sinks:lay.ring_start] = fam_v.transpose(0, 1)
        if fam:
            state.key_pos[sinks:lay.ring_start] = idx.fam_pos + size
        state.key_pos.index_fill_(0, idx.next_slots, EMPTY)
        self._place_sinks(state, idx.sink_pos)
        return self.logits(x[-1:])

    def fits_fill_block(self, state: FamState) -> bool:
        """Whether the stream's next whole block may go through fill_block: at a block boundary, past block 0 (the
        sinks are taken there, and the FAM's first update differs) and past the blocks before the window first
        leaves block 0 (the sinks get placed from then on); under fam_after_window past block M too (its tokens do
        not read the FAM yet)."""
        lay = self.layout
        first = max(1, lay.memory_blocks) + (1 if self.fam_config.gates_fam else 0)
        return (self.fam_config.mode != "full" and state.num_tokens % lay.block_size == 0
                and state.num_tokens // lay.block_size >= first)

    def block_indices(self, state: FamState, token_ids: torch.Tensor) -> BlockIndices:
        """The BlockIndices of the stream's next block, holding `token_ids` (L,)."""
        lay, start = self.layout, state.num_tokens
        block, rows = start // lay.block_size, torch.arange(lay.block_size)
        return BlockIndices(token=token_ids.to(self.device), pos=(start + rows).to(self.device),
                            slots=(lay.block_slot(block) + rows).to(self.device),
                            fam_pos=torch.arange(start - lay.num_fam, start, device=self.device),
                            next_slots=(lay.block_slot(block + 1) + rows).to(self.device),
                            sink_pos=self._sink_positions([block + 1]))

    def _plan(self, piece: StepPiece) -> "_PiecePlan":
        """Where a piece's tokens go and what they (and, if it fills its block, its FAM rows) may attend to; writes
        their positions into their slots' key_pos."""
        lay, st, t = self.layout, piece.state, piece.token_ids.numel()
        start = st.num_tokens
        if t == 0 or start % lay.block_size + t > lay.block_size:
            raise ValueError("a step piece must hold 1..(tokens left in the block) tokens")
        if self.fam_config.mode == "full" and start + t > lay.ring_blocks * lay.block_size:
            raise ContextLengthError(f"full attention holds at most {lay.ring_blocks * lay.block_size} tokens; "
                                     f"this stream would reach {start + t}")
        pos = torch.arange(start, start + t, device=self.device)
        block_slot = lay.block_slot(start // lay.block_size)
        slot = block_slot + start % lay.block_size
        st.key_pos[slot:slot + t] = pos
        # Slots past the high-water mark were never written: leave them out of the attention entirely.
        used = lay.ring_start + min(start + t, lay.ring_blocks * lay.block_size)
        mask = st.key_pos[None, :used] <= pos[:, None]  # (T, K_used)
        fam_pos = None
        if lay.num_fam and (start + t) % lay.block_size == 0:
            # The FAM queries see FAM_prev (its slots) and the whole block, nothing else; they sit at the F
            # positions before the block, where FAM_prev's keys are.
            block = start - start % lay.block_size
            fam_pos = torch.arange(block - lay.num_fam, block, device=self.device)
            fam_mask = torch.zeros(lay.num_fam, used, dtype=torch.bool, device=self.device)
            fam_mask[:, lay.num_sinks:lay.ring_start] = True
            fam_mask[:, block_slot:block_slot + lay.block_size] = True
            mask = torch.cat([mask, fam_mask])
        return _PiecePlan(st, piece.token_ids, start, t, pos, slot, mask, fam_pos)

    def prefill_blocks(self, state: FamState, token_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """BSWA only: read n >= 1 whole blocks of one stream, which starts at a block boundary, in ONE forward pass
        instead of n steps. Each block's window (its sinks as placed for it, the M blocks before it, itself up to the
        query) is known up front, so every block attends under one banded mask to [each block's sink copy | the
        ring's earlier blocks | the new blocks]. Leaves the state exactly as n steps would (the window moved on
        past the last block). Returns the last token's logits (1, V), or every token's (T, V).
        Costs up to (M + n) / (M + 1) times the attention arithmetic of n steps (masked keys are computed too): a
        win where a step's cost is launching kernels (a GPU), not on a CPU."""
        lay = self.layout
        t, start = token_ids.numel(), state.num_tokens
        if self.fam_config.mode != "bswa" or start % lay.block_size or t == 0 or t % lay.block_size:
            raise ValueError("prefill_blocks: BSWA, from a block boundary, whole blocks")
        first_block, n = start // lay.block_size, t // lay.block_size
        pos = torch.arange(start, start + t, device=self.device)
        # Earlier blocks still in the window of the first new block, oldest first.
        earlier = [b for b in range(first_block - lay.memory_blocks, first_block) if b >= 0]
        earlier_slots = torch.cat([torch.arange(lay.block_slot(b), lay.block_slot(b) + lay.block_size)
                                   for b in earlier]).to(self.device) if earlier else None
        key_pos = pos if earlier_slots is None else torch.cat([state.key_pos[earlier_slots], pos])
        # Each block sees its own copy of the sinks, placed as _start_next_block places them for it.
        sunk = [b for b in range(first_block, first_block + n) if self._sink_positions([b]).numel()]
        sink_pos = self._sink_positions(sunk)
        sink_cos, sink_sin = self.rotary.cos_sin(sink_pos, self.dtype)
        query_block = pos // lay.block_size
        visible = (key_pos[None, :] <= pos[:, None]) & (
            key_pos[None, :] // lay.block_size >= query_block[:, None] - lay.memory_blocks)
        sink_owner = torch.tensor(sunk, device=self.device).repeat_interleave(lay.num_sinks)
        mask = torch.cat([sink_owner[None, :] == query_block[:, None], visible], dim=1)  # (T, n_sunk*S + K)
        kept = range(max(0, n - lay.ring_blocks), n)  # the last R blocks read: the ring's content at the end
        cos, sin = self.rotary.cos_sin(pos, self.dtype)
        x = self.model.embed_tokens(token_ids.to(self.device))
        for l, layer in enumerate(self.model.layers):
            q, k, v, k_raw = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
            if start < lay.num_sinks:
                self._keep_sinks(state, l, start, k_raw, v)
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, T, D)
            if earlier_slots is not None:
                keys = torch.cat([state.k[l][:, earlier_slots], keys], dim=1)
                values = torch.cat([state.v[l][:, earlier_slots], values], dim=1)
            if sunk:
                keys = torch.cat([self._placed_sink_keys(state, l, sink_cos, sink_sin), keys], dim=1)
                values = torch.cat([state.v[l, :, :lay.num_sinks].repeat(1, len(sunk), 1), values], dim=1)
            for i in kept:
                slot, rows = lay.block_slot(first_block + i), slice(i * lay.block_size, (i + 1) * lay.block_size)
                state.k[l, :, slot:slot + lay.block_size] = k[rows].transpose(0, 1)
                state.v[l, :, slot:slot + lay.block_size] = v[rows].transpose(0, 1)
            x = layer.finish(x, attend(q, keys, values, mask))
        for i in kept:
            slot = lay.block_slot(first_block + i)
            state.key_pos[slot:slot + lay.block_size] = pos[i * lay.block_size:(i + 1) * lay.block_size]
        state.num_tokens += t
        self._start_next_block(state)
        return self.logits(x if all_logits else x[-1:])

    def _sink_positions(self, blocks: list[int]) -> torch.Tensor:
        """Where the sinks sit for each of these blocks (0-based): the S positions just before the block's window,
        once that window has left block 0; before that the first tokens are in the window itself (none here)."""
        lay = self.layout
        starts = [(b - lay.memory_blocks) * lay.block_size for b in blocks]
        return torch.tensor([w - lay.num_sinks + j for w in starts if w > 0 for j in range(lay.num_sinks)],
                            dtype=torch.int64, device=self.device)

    def _placed_sink_keys(self, state: FamState, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(Hkv, len(cos), D) the layer's sink keys rotated to the positions of cos/sin: one copy per S of them."""
        copies = state.sink_k[layer].repeat(1, cos.shape[0] // self.layout.num_sinks, 1)  # unrotated
        return rotate(copies.transpose(0, 1), cos, sin).transpose(0, 1)

    def _keep_sinks(self, st: FamState, layer: int, first: int, k_raw: torch.Tensor, v: torch.Tensor):
        """Remember the first S tokens' unrotated keys and their values (the piece's tokens start at position
        `first`); they become visible once their block leaves the window (_start_next_block)."""
        n = min(self.layout.num_sinks - first, k_raw.shape[0])
        st.sink_k[layer, :, first:first + n] = k_raw[:n].transpose(0, 1)
        st.v[layer, :, first:first + n] = v[:n].transpose(0, 1)

    # --- block completion ----------------------------------------------------------------------------------------

    def _start_next_block(self, state: FamState) -> None:
        """Called when the block being filled is full (its FAM update already done): free the next block's ring
        slots and re-position the sinks for its window."""
        lay = self.layout
        next_block = state.num_tokens // lay.block_size
        slot = lay.block_slot(next_block)
        state.key_pos[slot:slot + lay.block_size] = EMPTY
        pos = self._sink_positions([next_block])
        if pos.numel():
            self._place_sinks(state, pos)

    def _place_sinks(self, state: FamState, pos: torch.Tensor) -> None:
        """Rotate every layer's sink keys to `pos` (S,) and make them visible there."""
        cos, sin = self.rotary.cos_sin(pos, self.dtype)
        n, hkv, s, d = state.sink_k.shape  # every layer's sinks rotated in one go: (S, N*Hkv, D)
        placed = rotate(state.sink_k.permute(2, 0, 1, 3).reshape(s, n * hkv, d), cos, sin)
        state.k[:, :, :s] = placed.view(s, n, hkv, d).permute(1, 2, 0, 3)
        state.key_pos[:s] = pos


@dataclass
class _PiecePlan:
    """FamModel._plan's answer for one StepPiece."""

    state: FamState
    token_ids: torch.Tensor
    start: int  # position of the piece's first token
    size: int  # its tokens
    pos: torch.Tensor  # (T,) their positions
    slot: int  # the ring slot of its first token
    mask: torch.Tensor  # (T [+ F], K_used) what each token (then each FAM row, if fam_pos) may attend to
    fam_pos: torch.Tensor | None  # (F,) positions of the FAM queries when the piece fills its block, else None
