"""Self-checks of the reference TransformerFAM oracle (tests/engine/reference_fam.py).

The oracle is compared with transformers' LlamaForCausalLM (full mode; BSWA through a hand-built 4D mask; the
initial FAM and block 1 of FAM mode through prefix sequences with 4D masks) and with a second, differently built
implementation that drives transformers' own decoder-layer modules block by block over explicit row sequences
(FAM mode, sinks). Structural properties (causality, receptive fields, chunk independence) are checked directly.

Tolerance: transformers' LlamaRMSNorm and rotary embedding compute in float32 even in a float64 model (observed
differences ~1e-5 on logits of order 10). The comparisons therefore run a transformers model whose RMSNorm and
rotary-embedding modules are patched to stay in float64 (same formulas, no float32 cast; everything else is
transformers' own code) and use atol 1e-9; one test also checks the unpatched model at a relative tolerance of
1e-5. Oracle-vs-oracle comparisons are float64 and use atol 1e-10.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_fam import reference_logits, reference_run  # noqa: E402

from famserve.engine.config import FamConfig, ModelConfig, RopeScaling  # noqa: E402

transformers = pytest.importorskip("transformers")

HF_ATOL = 1e-9  # against transformers patched to float64 (see the module docstring)
HF_FLOAT32_RTOL = 1e-5  # against stock transformers, relative to the largest logit
EXACT_ATOL = 1e-10
VOCAB = 97


# --------------------------------------------------------------------------------------------------------------
# A tiny random Llama, with weights large enough that attention is peaked and masks visibly matter.
# --------------------------------------------------------------------------------------------------------------

def _rms_norm_float64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_float64(self, x, position_ids):
    base = self.config.rope_parameters["rope_theta"]
    dim = self.config.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def make_float64_exact(model):
    """Patch the two transformers modules that cast to float32 so that the whole model computes in float64."""
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_float64, module)
        elif type(module).__name__ == "LlamaRotaryEmbedding":
            assert module.rope_type == "default" and module.attention_scaling == 1.0
            module.forward = types.MethodType(_rotary_float64, module)
    return model


def make_model(tie: bool = False, bias: bool = False, seed: int = 0, theta: float = 10000.0, exact: bool = True):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=theta, max_position_embeddings=1024,
        tie_word_embeddings=tie, attention_bias=bias, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            else:  # projections (out, in): keep activations O(1), attention scores of a few units
                gain = 2.0 if any(k in name for k in ("q_proj", "k_proj")) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=gen, dtype=torch.float64) / p.shape[1] ** 0.5)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if exact:
        make_float64_exact(model)
    if tie:
        weights.pop("lm_head.weight", None)  # a tied checkpoint carries no lm_head
    config = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         rope_theta=theta, tie_word_embeddings=tie, attention_bias=bias)
    return weights, config, model


@pytest.fixture(scope="module")
def tiny():
    return make_model()


def random_tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, tokens: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """transformers logits; `allowed` (T, T) bool turns into a 4D additive float mask."""
    kwargs = {}
    if allowed is not None:
        mask = torch.zeros(allowed.shape, dtype=torch.float64)
        mask[~allowed] = float("-inf")
        kwargs["attention_mask"] = mask[None, None]
    with torch.no_grad():
        return model(input_ids=tokens[None], **kwargs).logits[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# A second implementation: transformers' decoder layers driven block by block over explicit row sequences.
# --------------------------------------------------------------------------------------------------------------

def hf_blockwise_run(model, fam: FamConfig, tokens: torch.Tensor, prompt: torch.Tensor | None = None):
    """Per layer and block, build the rows [sinks; memory; FAM_prev; block] with their RoPE positions and a 4D
    mask saying which query row sees which key row, and run transformers' decoder layer over them. Rows that are
    there only as keys (sinks, memory) see themselves only; their outputs are thrown away."""
    inner = model.model
    L, M = fam.block_size, fam.memory_blocks
    F = fam.fam_length if fam.mode == "fam" else 0
    S = fam.sink_tokens
    T = tokens.numel()

    def pe(positions):
        return inner.rotary_emb(torch.zeros(1, dtype=torch.float64), positions[None])

    def mask_of(allowed):
        m = torch.zeros(allowed.shape, dtype=torch.float64)
        m[~allowed] = float("-inf")
        return m[None, None]

    with torch.no_grad():
        fam0 = []
        if F > 0:
            x = inner.embed_tokens.weight.mean(0, keepdim=True).repeat(F, 1) if prompt is None else prompt
            for layer in inner.layers:
                fam0.append(x)
                x = layer(x[None], attention_mask=mask_of(torch.ones(F, F, dtype=torch.bool)),
                          position_embeddings=pe(torch.arange(-F, 0)))[0]
        x = inner.embed_tokens(tokens)
        fam_final = []
        for li, layer in enumerate(inner.layers):
            out = torch.empty_like(x)
            fam_prev = fam0[li] if F > 0 else None
            for b in range(0, T, L):
                e = min(b + L, T)
                w = b - M * L
                rows, pos, kinds = [], [], []  # kinds: "key" (sinks, memory), "fam", "tok"
                if S > 0 and w > 0:
                    rows.append(x[:S]); pos += list(range(w - S, w)); kinds += ["key"] * S
                lo = max(w, 0)
                rows.append(x[lo:b]); pos += list(range(lo, b)); kinds += ["key"] * (b - lo)
                if F > 0:
                    rows.append(fam_prev); pos += list(range(b - F, b)); kinds += ["fam"] * F
                rows.append(x[b:e]); pos += list(range(b, e)); kinds += ["tok"] * (e - b)
                n = len(kinds)
                allowed = torch.zeros(n, n, dtype=torch.bool)
                tok_idx = [j for j in range(n) if kinds[j] == "tok"]
                fam_idx = [j for j in range(n) if kinds[j] == "fam"]
                for i in range(n):
                    if kinds[i] == "key":
                        allowed[i, i] = True
                    elif kinds[i] == "fam":
                        allowed[i, fam_idx + tok_idx] = True
                    else:
                        allowed[i, :i + 1] = True  # sinks, memory, FAM, earlier block tokens, itself
                seq = torch.cat(rows)[None]
                pos_t = torch.tensor(pos)
                y = layer(seq, attention_mask=mask_of(allowed), position_embeddings=pe(pos_t))[0]
                out[b:e] = y[tok_idx]
                if F > 0 and e - b == L:
                    if b == 0:  # first update: attention residual of the FAM rows is zero
                        a, _ = layer.self_attn(layer.input_layernorm(seq), position_embeddings=pe(pos_t),
                                               attention_mask=mask_of(allowed))
                        a = a[0, fam_idx]
                        fam_prev = a + layer.mlp(layer.post_attention_layernorm(a))
                    else:
                        fam_prev = y[fam_idx]
            fam_final.append(fam_prev)
            x = out
        logits = model.lm_head(inner.norm(x))
    return logits, fam0, fam_final


# --------------------------------------------------------------------------------------------------------------
# (1) full mode equals transformers.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_full_mode_matches_transformers(tie, bias):
    weights, config, model = make_model(tie=tie, bias=bias, seed=3)
    tokens = random_tokens(50, seed=4)
    ours = reference_logits(weights, config, FamConfig(mode="full", block_size=8, memory_blocks=1, sink_tokens=2),
                            tokens)
    assert ours.dtype == torch.float64 and ours.shape == (50, VOCAB)
    assert ours.abs().max() > 1.0  # logits are not trivially small
    assert max_diff(ours, hf_logits(model, tokens)) < HF_ATOL


@pytest.mark.parametrize("tie", [False, True])
def test_full_mode_matches_stock_transformers(tie):
    weights, config, model = make_model(tie=tie, bias=True, seed=6, theta=500.0, exact=False)
    tokens = random_tokens(60, seed=8)
    ours = reference_logits(weights, config, FamConfig(mode="full"), tokens)
    theirs = hf_logits(model, tokens)
    assert max_diff(ours, theirs) < HF_FLOAT32_RTOL * theirs.abs().max().item()


def test_missing_lm_head_needs_tied_embeddings():
    weights, config, _ = make_model(tie=False, seed=5)
    weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError):
        reference_logits(weights, config, FamConfig(mode="full"), random_tokens(4))


def test_rope_scaling_is_refused(tiny):
    weights, config, _ = tiny
    scaled = ModelConfig(**{**config.__dict__, "rope_scaling": RopeScaling("linear", 2.0)})
    with pytest.raises(ValueError):
        reference_logits(weights, scaled, FamConfig(mode="full"), random_tokens(4))


# --------------------------------------------------------------------------------------------------------------
# (2) BSWA with the whole input inside the window equals full attention; (3) BSWA equals a 4D-mask transformers.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sinks", [0, 3])
def test_bswa_with_window_covering_input_equals_full(tiny, sinks):
    weights, config, _ = tiny
    tokens = random_tokens(40)
    full = reference_logits(weights, config, FamConfig(mode="full"), tokens)
    # M*L = 40 >= T: the window start w = b - 40 is never > 0, so sinks never activate either.
    bswa = reference_logits(weights, config, FamConfig(mode="bswa", block_size=8, memory_blocks=5,
                                                       sink_tokens=sinks), tokens)
    assert max_diff(bswa, full) < EXACT_ATOL


def bswa_allowed(T: int, L: int, M: int) -> torch.Tensor:
    """Query i sees key j iff j <= i and block(j) >= block(i) - M."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j <= i) & (j // L >= i // L - M)


@pytest.mark.parametrize("L,M,T", [(8, 2, 50), (5, 1, 33), (4, 0, 21), (7, 3, 56)])
def test_bswa_matches_transformers_with_sliding_window_mask(tiny, L, M, T):
    weights, config, model = tiny
    tokens = random_tokens(T, seed=L + M)
    ours = reference_logits(weights, config, FamConfig(mode="bswa", block_size=L, memory_blocks=M,
                                                       sink_tokens=0), tokens)
    assert max_diff(ours, hf_logits(model, tokens, bswa_allowed(T, L, M))) < HF_ATOL
    # ...and the window visibly matters: full attention differs after the first window.
    assert max_diff(ours[(M + 1) * L:], hf_logits(model, tokens)[(M + 1) * L:]) > 1e-2


# --------------------------------------------------------------------------------------------------------------
# Initial FAM and block 1 of FAM mode, against transformers with prefix sequences.
# --------------------------------------------------------------------------------------------------------------

def test_initial_fam_matches_transformers_bidirectional_prompt(tiny):
    weights, config, model = tiny
    F = 5
    prompt = torch.randn(F, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res = reference_run(weights, config, FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=F,
                                                   sink_tokens=0), random_tokens(3), fam_prompt=prompt)
    with torch.no_grad():
        out = model.model(inputs_embeds=prompt[None], position_ids=torch.arange(-F, 0)[None],
                          attention_mask=torch.zeros(1, 1, F, F, dtype=torch.float64), output_hidden_states=True)
    assert len(res.fam0) == config.num_layers
    for layer in range(config.num_layers):
        assert max_diff(res.fam0[layer], out.hidden_states[layer][0]) < HF_ATOL
    # the default prompt is the mean embedding row, repeated
    res_default = reference_run(weights, config, FamConfig(mode="fam", block_size=8, fam_length=F, sink_tokens=0),
                                random_tokens(3))
    mean = weights["model.embed_tokens.weight"].mean(0)
    assert max_diff(res_default.fam0[0], mean.expand(F, -1)) < EXACT_ATOL


@pytest.mark.parametrize("T", [8, 5])
def test_fam_block_one_matches_transformers_prompt_prefix(tiny, T):
    """Tokens of block 1 see FAM_0[l] at positions -F..-1 in every layer, and FAM_0[l] is P propagated with
    bidirectional attention: exactly transformers on [P; tokens] where P rows see only P rows."""
    weights, config, model = tiny
    F, L = 4, 8
    prompt = torch.randn(F, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tokens = random_tokens(T, seed=11)
    ours = reference_logits(weights, config, FamConfig(mode="fam", block_size=L, memory_blocks=1, fam_length=F,
                                                       sink_tokens=2), tokens, fam_prompt=prompt)
    n = F + T
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:F, :F] = True
    allowed[F:, :F] = True
    allowed[F:, F:] = torch.ones(T, T).tril().bool()
    mask = torch.zeros(n, n, dtype=torch.float64)
    mask[~allowed] = float("-inf")
    with torch.no_grad():
        embeds = torch.cat([prompt, model.model.embed_tokens(tokens)])[None]
        hf = model(inputs_embeds=embeds, position_ids=torch.arange(-F, T)[None], attention_mask=mask[None, None])
    assert max_diff(ours, hf.logits[0, F:]) < HF_ATOL


# --------------------------------------------------------------------------------------------------------------
# FAM mode and sinks against transformers' layers driven block by block.
# --------------------------------------------------------------------------------------------------------------

FAM_CASES = [
    (FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=0), 44),
    (FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=3), 44),
    (FamConfig(mode="fam", block_size=6, memory_blocks=2, fam_length=9, sink_tokens=2), 41),  # F > L
    (FamConfig(mode="fam", block_size=5, memory_blocks=0, fam_length=3, sink_tokens=1), 30),  # M = 0, no partial
]
BSWA_CASES = [
    (FamConfig(mode="bswa", block_size=8, memory_blocks=1, sink_tokens=4), 44),
    (FamConfig(mode="bswa", block_size=4, memory_blocks=2, sink_tokens=4), 37),  # S = L
]


# A custom FAM prompt only matters in fam mode, so bswa runs with the default prompt alone.
@pytest.mark.parametrize("fam_cfg,T,custom_prompt", [(*case, False) for case in FAM_CASES + BSWA_CASES]
                         + [(*case, True) for case in FAM_CASES])
def test_matches_transformers_layers_blockwise(tiny, fam_cfg, T, custom_prompt):
    weights, config, model = tiny
    F = fam_cfg.fam_length
    prompt = (torch.randn(F, 64, generator=torch.Generator().manual_seed(F), dtype=torch.float64)
              if custom_prompt else None)
    tokens = random_tokens(T, seed=T)
    res = reference_run(weights, config, fam_cfg, tokens, fam_prompt=prompt)
    logits, fam0, fam_final = hf_blockwise_run(model, fam_cfg, tokens, prompt)
    assert max_diff(res.logits, logits) < HF_ATOL
    if fam_cfg.mode == "fam":
        for layer in range(config.num_layers):
            assert max_diff(res.fam0[layer], fam0[layer]) < HF_ATOL
            assert max_diff(res.fam_final[layer], fam_final[layer]) < HF_ATOL
        # FAM really is attended: plain BSWA gives other logits from block 1 on
        bswa = reference_logits(weights, config, FamConfig(mode="bswa", block_size=fam_cfg.block_size,
                                                           memory_blocks=fam_cfg.memory_blocks,
                                                           sink_tokens=fam_cfg.sink_tokens), tokens)
        assert max_diff(res.logits[: fam_cfg.block_size], bswa[: fam_cfg.block_size]) > 1e-3


def test_fam_with_zero_length_is_bswa(tiny):
    weights, config, _ = tiny
    tokens = random_tokens(30)
    a = reference_logits(weights, config, FamConfig(mode="fam", block_size=6, memory_blocks=1, fam_length=0,
                                                    sink_tokens=2), tokens)
    b = reference_logits(weights, config, FamConfig(mode="bswa", block_size=6, memory_blocks=1, sink_tokens=2),
                         tokens)
    assert max_diff(a, b) < EXACT_ATOL


# --------------------------------------------------------------------------------------------------------------
# (4) FAM: causality, and information beyond the window; (5) sinks.
# --------------------------------------------------------------------------------------------------------------

L4, M4, T4 = 8, 1, 48  # 6 blocks; with N = 2 layers BSWA's receptive field is N*M = 2 blocks back


def changed(tokens: torch.Tensor, position: int) -> torch.Tensor:
    other = tokens.clone()
    other[position] = (tokens[position] + 1) % VOCAB
    return other


def beyond_window(config: ModelConfig) -> slice:
    """Positions of blocks tau > N*M + 1: no chain of N sliding windows reaches block 1 from there."""
    return slice((config.num_layers * M4 + 1) * L4, T4)


@pytest.mark.parametrize("sinks", [0, 2])
def test_fam_is_causal(tiny, sinks):
    weights, config, _ = tiny
    fam = FamConfig(mode="fam", block_size=L4, memory_blocks=M4, fam_length=4, sink_tokens=sinks)
    tokens = random_tokens(T4)
    base = reference_logits(weights, config, fam, tokens)
    other = tokens.clone()
    other[L4:] = random_tokens(T4 - L4, seed=99)
    assert max_diff(reference_logits(weights, config, fam, other)[:L4], base[:L4]) < EXACT_ATOL
    for pos in (L4, 2 * L4 + 3, T4 - 1):  # and in general: nothing depends on a later token
        assert max_diff(reference_logits(weights, config, fam, changed(tokens, pos))[:pos], base[:pos]) < EXACT_ATOL


@pytest.mark.parametrize("mode", ["fam", "bswa", "full"])
def test_prefix_logits_and_state_are_chunk_independent(tiny, mode):
    """Running a prefix alone gives the same logits as the prefix of a longer run (partial blocks included),
    and the FAM state after k complete blocks is what block k+1 of the long run attended to."""
    weights, config, _ = tiny
    fam = FamConfig(mode=mode, block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2)
    tokens = random_tokens(33)
    whole = reference_run(weights, config, fam, tokens)
    for k in (1, 5, 6, 7, 12, 20, 30):
        part = reference_run(weights, config, fam, tokens[:k])
        assert max_diff(part.logits, whole.logits[:k]) < EXACT_ATOL
        if mode == "fam":
            for layer in range(config.num_layers):
                assert max_diff(part.fam_final[layer], whole.fam_history[k // 6][layer]) < EXACT_ATOL


def test_fam_carries_information_beyond_the_window(tiny):
    weights, config, _ = tiny
    tokens = random_tokens(T4)
    far = beyond_window(config)
    fam = FamConfig(mode="fam", block_size=L4, memory_blocks=M4, fam_length=4, sink_tokens=0)
    bswa = FamConfig(mode="bswa", block_size=L4, memory_blocks=M4, sink_tokens=0)
    for pos in (0, 3, L4 - 1):  # any token of block 1
        other = changed(tokens, pos)
        d_fam = max_diff(reference_logits(weights, config, fam, other)[far],
                         reference_logits(weights, config, fam, tokens)[far])
        d_bswa = max_diff(reference_logits(weights, config, bswa, other)[far],
                          reference_logits(weights, config, bswa, tokens)[far])
        assert d_fam > 1e-4, d_fam
        assert d_bswa == 0.0, d_bswa
    # one block closer (tau = N*M + 1) BSWA does still see block 1 through the layers
    near = slice(config.num_layers * M4 * L4, (config.num_layers * M4 + 1) * L4)
    assert max_diff(reference_logits(weights, config, bswa, changed(tokens, 3))[near],
                    reference_logits(weights, config, bswa, tokens)[near]) > 1e-4


def test_sinks_carry_the_first_tokens_forever(tiny):
    weights, config, _ = tiny
    tokens = random_tokens(T4)
    far = beyond_window(config)
    with_sinks = FamConfig(mode="bswa", block_size=L4, memory_blocks=M4, sink_tokens=4)
    no_sinks = FamConfig(mode="bswa", block_size=L4, memory_blocks=M4, sink_tokens=0)

    def far_change(fam, pos):
        return max_diff(reference_logits(weights, config, fam, changed(tokens, pos))[far],
                        reference_logits(weights, config, fam, tokens)[far])

    assert far_change(with_sinks, 0) > 1e-4
    assert far_change(with_sinks, 3) > 1e-4  # the last sink token
    assert far_change(no_sinks, 0) == 0.0
    assert far_change(with_sinks, 5) == 0.0  # a non-sink token of block 1: out of reach
    # sinks only appear once block 1 has left the window: block 2 (w = 0) is identical with and without sinks
    assert max_diff(reference_logits(weights, config, with_sinks, tokens)[: 2 * L4],
                    reference_logits(weights, config, no_sinks, tokens)[: 2 * L4]) < EXACT_ATOL


def test_sinks_are_repositioned_not_at_original_positions(tiny):
    """Compared with sinks kept at their original positions 0..S-1 (built with a 4D mask over transformers),
    the re-positioned sinks give different logits beyond the window, while within it nothing differs."""
    weights, config, model = tiny
    S = 4
    tokens = random_tokens(T4)
    ours = reference_logits(weights, config, FamConfig(mode="bswa", block_size=L4, memory_blocks=M4,
                                                       sink_tokens=S), tokens)
    allowed = bswa_allowed(T4, L4, M4)
    allowed[:, :S] |= torch.ones(T4, S).bool() & (torch.arange(T4)[:, None] >= S)
    original = hf_logits(model, tokens, allowed)
    assert max_diff(ours[: 2 * L4], original[: 2 * L4]) < HF_ATOL
    assert max_diff(ours[2 * L4:], original[2 * L4:]) > 1e-4


def test_runtime_is_small(tiny):
    weights, config, _ = tiny
    tokens = random_tokens(100)
    start = time.perf_counter()
    reference_logits(weights, config, FamConfig(mode="fam", block_size=16, memory_blocks=1, fam_length=4,
                                                sink_tokens=4), tokens)
    assert time.perf_counter() - start < 5.0
