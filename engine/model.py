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

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, delta: LayerDelta | None = None):
        """x (T, C) normed -> q (T, H, D) and k (T, Hkv, D) rotated, v (T, Hkv, D), and the unrotated k.
        `delta`: the layer's FAM-row LoRA, given only for FAM rows (fam_lora.py)."""
        t = x.shape[0]
        q = _project(self.q_proj, "q_proj", x, delta).view(t, self.num_heads, self.head_dim)  # (T, H, D)
        k_raw = _project(self.k_proj, "k_proj", x, delta).view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = _project(self.v_proj, "v_proj", x, delta).view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        return rotate(q, cos, sin), rotate(k_raw, cos, sin), v, k_raw


def _project(linear: nn.Linear, name: str, x: torch.Tensor, delta: LayerDelta | None) -> torch.Tensor:
    return linear(x) if delta is None else delta.project(name, linear, x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, delta: LayerDelta | None = None) -> torch.Tensor:
        hidden = fn.silu(_project(self.gate_proj, "gate_proj", x, delta)) * _project(self.up_proj, "up_proj", x, delta)
        return _project(self.down_proj, "down_proj", hidden, delta)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def finish(self, residual: torch.Tensor, attn: torch.Tensor, delta: LayerDelta | None = None) -> torch.Tensor:
        """attn (T, H*D) attention output -> the layer's output rows, given the attention residual."""
        h = residual + _project(self.self_attn.o_proj, "o_proj", attn, delta)
        return h + self.mlp(self.post_attention_layernorm(h), delta)


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


class FamModel(nn.Module):
    """A Llama-family decoder that advances FamStates. `step` runs the tokens of many streams at once (dense layers
    batched over all their rows, attention per stream against its own slots); `complete_block` runs the FAM update
    and moves the window when a stream's block fills up."""

    def __init__(self, cfg: ModelConfig, fam: FamConfig):
        super().__init__()
        self.config, self.fam_config = cfg, fam
        self.layout = StateLayout.from_configs(cfg, fam)
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self._blank: FamState | None = None  # a fresh stream's state (holds FAM_0), built once
        self.fam_lora: FamLoRA | None = None  # deltas for the FAM rows only (an adapter's), see set_fam_lora

    # --- weights ------------------------------------------------------------------------------------------------

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, C) last-layer rows -> (T, V) logits, float32 (or float64 for a float64 model)."""
        out = fn.linear(self.model.norm(hidden), self.output_weight())
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

    def set_fam_lora(self, fam_lora: FamLoRA | None) -> None:
        """Use these FAM-row deltas (on the model's device and dtype) from the next fresh state on."""
        self.fam_lora = None if fam_lora is None else fam_lora.to(device=self.device, dtype=self.dtype)
        self._blank = None

    def fam_delta(self, layer: int) -> LayerDelta | None:
        """The FAM-row LoRA of one layer, or None (the FAM rows then use the base weights)."""
        return None if self.fam_lora is None else self.fam_lora.layers[layer]

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
            _, k, v, _ = layer.self_attn.qkv(layer.input_layernorm(state.fam[l]), cos, sin, self.fam_delta(l))
            state.k[l, :, lay.num_sinks:lay.ring_start] = k.transpose(0, 1)
            state.v[l, :, lay.num_sinks:lay.ring_start] = v.transpose(0, 1)
        state.key_pos[lay.num_sinks:lay.ring_start] = pos

    # --- the streaming step --------------------------------------------------------------------------------------

    def step(self, pieces: list[StepPiece], all_logits: bool = False) -> list[torch.Tensor]:
        """Run each piece's tokens through the network, writing their keys/values into its state.
        Returns per piece the logits (T, V) of every token if all_logits, else of its last token (1, V).
        The caller completes blocks (complete_block) when a piece fills its stream's block."""
        lay = self.layout
        positions, masks, slots, starts = [], [], [], []
        for piece in pieces:
            st, t = piece.state, piece.token_ids.numel()
            start = st.num_tokens
            starts.append(start)
            if t == 0 or start % lay.block_size + t > lay.block_size:
                raise ValueError("a step piece must hold 1..(tokens left in the block) tokens")
            if self.fam_config.mode == "full" and start + t > lay.ring_blocks * lay.block_size:
                raise ContextLengthError(f"full attention holds at most {lay.ring_blocks * lay.block_size} tokens; "
                                         f"this stream would reach {start + t}")
            pos = torch.arange(start, start + t, device=self.device)
            slot = lay.block_slot(start // lay.block_size) + start % lay.block_size
            st.key_pos[slot:slot + t] = pos
            # Slots past the high-water mark were never written: leave them out of the attention entirely.
            used = lay.ring_start + min(start + t, lay.ring_blocks * lay.block_size)
            masks.append(st.key_pos[None, :used] <= pos[:, None])  # (T, K_used)
            positions.append(pos)
            slots.append(slot)
        sizes = [p.token_ids.numel() for p in pieces]
        all_pos = torch.cat(positions)
        cos, sin = self.rotary.cos_sin(all_pos, self.dtype)
        x = self.model.embed_tokens(torch.cat([p.token_ids for p in pieces]).to(self.device))  # (sum T, C)
        for l, layer in enumerate(self.model.layers):
            q, k, v, k_raw = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
            outs, row = [], 0
            for piece, t, slot, mask, start in zip(pieces, sizes, slots, masks, starts):
                st = piece.state
                st.k[l, :, slot:slot + t] = k[row:row + t].transpose(0, 1)
                st.v[l, :, slot:slot + t] = v[row:row + t].transpose(0, 1)
                if start < lay.num_sinks:  # a Python int: testing a device tensor here would sync every layer
                    self._keep_sinks(st, l, start, k_raw[row:row + t], v[row:row + t])
                used = mask.shape[1]
                outs.append(attend(q[row:row + t], st.k[l, :, :used], st.v[l, :, :used], mask))
                row += t
            x = layer.finish(x, torch.cat(outs))
        for piece, t in zip(pieces, sizes):
            piece.state.num_tokens += t
        out, row = [], 0
        for t in sizes:
            rows = x[row:row + t] if all_logits else x[row + t - 1:row + t]
            out.append(self.logits(rows))
            row += t
        return out

    def prefill_blocks(self, state: FamState, token_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """BSWA only: read n >= 1 whole blocks of one stream, which starts at a block boundary, in ONE forward pass
        instead of n steps. Each block's window (its sinks as placed for it, the M blocks before it, itself up to the
        query) is known up front, so every block attends under one banded mask to [each block's sink copy | the
        ring's earlier blocks | the new blocks]. Leaves the state exactly as n steps would, before complete_block of
        the last block (the caller runs it). Returns the last token's logits (1, V), or every token's (T, V).
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
        # Each block sees its own copy of the sinks, placed as complete_block places them for it.
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
        `first`); they become visible once their block leaves the window (complete_block)."""
        n = min(self.layout.num_sinks - first, k_raw.shape[0])
        st.sink_k[layer, :, first:first + n] = k_raw[:n].transpose(0, 1)
        st.v[layer, :, first:first + n] = v[:n].transpose(0, 1)

    # --- block completion ----------------------------------------------------------------------------------------

    def complete_block(self, state: FamState) -> None:
        """Called when the block being filled is full: update each layer's FAM from [FAM_prev | block], then
        start the next block: free its ring slots, re-position the sinks, project the new FAM to keys."""
        lay = self.layout
        assert state.num_tokens > 0 and state.num_tokens % lay.block_size == 0, "block is not complete"
        finished = state.num_tokens // lay.block_size - 1  # 0-based index of the full block
        if lay.num_fam:
            self._update_fam(state, finished)
        slot = lay.block_slot(finished + 1)
        state.key_pos[slot:slot + lay.block_size] = EMPTY
        pos = self._sink_positions([state.num_tokens // lay.block_size])
        if pos.numel():
            cos, sin = self.rotary.cos_sin(pos, self.dtype)
            for l in range(lay.num_layers):
                state.k[l, :, :lay.num_sinks] = self._placed_sink_keys(state, l, cos, sin)
            state.key_pos[:lay.num_sinks] = pos
        if lay.num_fam:
            self._write_fam_keys(state)

    def _update_fam(self, state: FamState, block_index: int) -> None:
        lay = self.layout
        b = block_index * lay.block_size
        cos, sin = self.rotary.cos_sin(torch.arange(b - lay.num_fam, b, device=self.device), self.dtype)
        slot = lay.block_slot(block_index)
        first_update = state.num_fam_updates == 0
        for l, layer in enumerate(self.model.layers):
            fam, delta = state.fam[l], self.fam_delta(l)  # (F, C)
            q, _, _, _ = layer.self_attn.qkv(layer.input_layernorm(fam), cos, sin, delta)
            # FAM queries see FAM_prev (already projected in the fam slots) and the whole block, nothing else.
            k = torch.cat([state.k[l, :, lay.num_sinks:lay.ring_start], state.k[l, :, slot:slot + lay.block_size]],
                          dim=1)  # (Hkv, F + L, D)
            v = torch.cat([state.v[l, :, lay.num_sinks:lay.ring_start], state.v[l, :, slot:slot + lay.block_size]],
                          dim=1)
            # The first update's residual is zeros: FAM_0 carries no context (paper B.1).
            residual = torch.zeros_like(fam) if first_update else fam
            state.fam[l] = layer.finish(residual, attend(q, k, v, None), delta)
        state.num_fam_updates += 1
