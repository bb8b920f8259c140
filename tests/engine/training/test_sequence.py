"""The differentiable all-at-once model (engine/training/sequence.py) computes what the streaming engine computes:
logits equal ModelRunner's at 1e-9 in float64 (every mode, sinks, partial last block, a batch of different
sequences, a carried FAM); gradients reach the FAM prompt and LoRA, and reach past the BSWA receptive field only
through the FAM. The merged-weight LoRA (lora.py) gives the textbook form's outputs and gradients, and the block
attention's two kernels (CPU mask, GPU causal bias) agree."""

import pytest
import torch

from famserve.engine.config import FamConfig, ModelConfig
from famserve.engine.model import FamModel
from famserve.engine.runner import ModelRunner
from famserve.engine.training.lora import ALL_TARGETS, apply_lora, lora_modules
from famserve.engine.training.sequence import (_causal_bottom_right, forward_sequence, masked_loss,
                                               sequence_logits)

ATOL = 1e-9  # float64: any difference is a bug, not rounding


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(architecture="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8), **overrides})


def random_model(cfg: ModelConfig, fam: FamConfig, seed: int = 0, dtype=torch.float64) -> FamModel:
    torch.manual_seed(seed)
    model = FamModel(cfg, fam)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model.to_device("cpu", dtype)


CASES = [
    # (model overrides, fam config, tokens): partial last blocks unless noted
    ({}, dict(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2), 41),
    ({}, dict(mode="fam", block_size=5, memory_blocks=0, fam_length=7, sink_tokens=0), 35),  # whole blocks
    ({}, dict(mode="fam", block_size=4, memory_blocks=2, fam_length=2, sink_tokens=4), 31),
    ({}, dict(mode="fam", block_size=8, memory_blocks=1, fam_length=3, sink_tokens=2), 5),  # one partial block
    ({"tie_word_embeddings": True, "attention_bias": True},
     dict(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=1), 29),
    ({}, dict(mode="bswa", block_size=6, memory_blocks=2, sink_tokens=3), 43),
    ({}, dict(mode="bswa", block_size=5, memory_blocks=0, sink_tokens=0), 23),
    ({}, dict(mode="full", block_size=8, full_context_tokens=64), 37),
]


@pytest.mark.parametrize("overrides,fam,n_tokens", CASES, ids=[f"{c[1]['mode']}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("custom_prompt", [False, True], ids=["default-prompt", "custom-prompt"])
def test_sequence_equals_streaming_engine(overrides, fam, n_tokens, custom_prompt):
    fam_cfg = FamConfig(**fam)
    model = random_model(tiny_config(**overrides), fam_cfg, seed=n_tokens)
    prompt = (torch.randn(fam_cfg.fam_length, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
              if custom_prompt and fam_cfg.mode == "fam" else None)
    model.set_fam_prompt(prompt)
    tokens = torch.randint(0, 61, (2, n_tokens), generator=torch.Generator().manual_seed(2))  # a batch of 2

    got = sequence_logits(model, fam_cfg, tokens, fam_prompt=prompt)  # (2, T, V)
    for row in range(2):
        state = model.new_state()
        want = ModelRunner(model).run([state], [tokens[row]], all_logits=True)[0]
        torch.testing.assert_close(got[row], want, atol=ATOL, rtol=0)
        if fam_cfg.mode == "fam":
            out = forward_sequence(model, fam_cfg, tokens, fam_prompt=prompt)
            torch.testing.assert_close(out.fam[:, row], state.fam, atol=ATOL, rtol=0)
            assert out.num_fam_updates == state.num_fam_updates


def test_carried_fam_equals_a_continuing_stream():
    """With M=0 and S=0 nothing but the FAM crosses a block boundary, so a sequence that starts from the FAM
    carried out of a previous one (fresh=False: no zero residual) equals the engine continuing the stream."""
    fam_cfg = FamConfig(mode="fam", block_size=5, memory_blocks=0, fam_length=3, sink_tokens=0)
    model = random_model(tiny_config(), fam_cfg, seed=3)
    first, second = torch.randint(0, 61, (2, 1, 15), generator=torch.Generator().manual_seed(4))
    carried = forward_sequence(model, fam_cfg, first).fam  # (N, 1, F, C)
    got = sequence_logits(model, fam_cfg, second, start_fam=carried, fresh=torch.tensor([False]))[0]

    state, runner = model.new_state(), ModelRunner(model)
    runner.run([state], [first[0]])
    want = runner.run([state], [second[0]], all_logits=True)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    fresh = sequence_logits(model, fam_cfg, second, start_fam=carried, fresh=torch.tensor([True]))[0]
    assert (fresh - want).abs().max() > 1e-3  # the zero residual of a fresh start really differs


def _far_gradient(mode: str) -> torch.Tensor:
    """Gradient of a loss on the last token w.r.t. the input embedding of each token of the first block."""
    fam_cfg = FamConfig(mode=mode, block_size=4, memory_blocks=1, fam_length=2, sink_tokens=2)
    model = random_model(tiny_config(), fam_cfg, seed=5)
    tokens = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(6))
    embeds = model.model.embed_tokens(tokens).detach().requires_grad_(True)
    logits = model.logits(forward_sequence(model, fam_cfg, inputs_embeds=embeds).hidden)
    logits[0, -1].log_softmax(-1)[7].backward()
    return embeds.grad[0, :4].norm(dim=-1)  # (4,) the first block


def test_gradient_reaches_beyond_the_window_only_through_fam():
    # Receptive field of BSWA here: 2 layers x (M+1) x L = 16 tokens; the loss sits at position 39.
    bswa, fam = _far_gradient("bswa"), _far_gradient("fam")
    assert bswa[2:].abs().max() == 0  # positions 2, 3: not sinks, out of reach without FAM
    assert bswa[:2].min() > 0  # positions 0, 1 are attention sinks, visible forever
    assert fam.min() > 1e-6


def test_gradients_reach_prompt_and_lora_and_checkpointing_matches():
    fam_cfg = FamConfig(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2)
    model = random_model(tiny_config(), fam_cfg, seed=7)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    for m in lora_modules(model).values():  # B starts at 0 (no gradient to A then): make both live
        torch.nn.init.normal_(m.lora_b, std=0.1)
    prompt = torch.nn.Parameter(torch.randn(3, 32, dtype=torch.float64))
    tokens = torch.randint(0, 61, (2, 33), generator=torch.Generator().manual_seed(8))
    labels = torch.full_like(tokens, -100)
    labels[:, -4:] = tokens[:, -4:]

    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        prompt.grad = None
        out = forward_sequence(model, fam_cfg, tokens, fam_prompt=prompt, checkpoint=checkpoint)
        masked_loss(model, out.hidden, labels).loss.backward()
        params = [prompt] + [p for m in lora_modules(model).values() for p in (m.lora_a, m.lora_b)]
        grads.append([p.grad.clone() for p in params])
    for g in grads[0]:
        assert torch.isfinite(g).all() and g.abs().max() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # base stays frozen
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-12, rtol=0)


def test_masked_loss_chunks_equal_one_pass():
    fam_cfg = FamConfig(mode="bswa", block_size=6, memory_blocks=1, sink_tokens=0)
    model = random_model(tiny_config(), fam_cfg, seed=9)
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(10))
    hidden = forward_sequence(model, fam_cfg, tokens).hidden
    labels = torch.roll(tokens, -1, dims=1)
    whole = masked_loss(model, hidden, labels, chunk_rows=1000)
    chunked = masked_loss(model, hidden, labels, chunk_rows=7)
    want = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), labels.flatten())
    for terms in (whole, chunked):
        torch.testing.assert_close(terms.loss, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(terms.cross_entropy, want, atol=1e-12, rtol=0)
        assert terms.kl is None
    assert torch.equal(whole.predictions, chunked.predictions)


def test_masked_loss_distills_the_teachers_distribution():
    """With a teacher's rows the loss is (1 - w) * CE + w * KL(teacher || model) on the labelled positions, in
    chunks or in one pass; a teacher identical to the model costs no KL."""
    fam_cfg = FamConfig(mode="bswa", block_size=6, memory_blocks=1, sink_tokens=0)
    model = random_model(tiny_config(), fam_cfg, seed=9)
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(10))
    hidden = forward_sequence(model, fam_cfg, tokens).hidden
    teacher = forward_sequence(model, FamConfig(mode="full"), tokens).hidden  # sees what the window hides
    labels = torch.roll(tokens, -1, dims=1)
    labels[0, :9] = -100
    keep = labels != -100
    student_logp = model.logits(hidden)[keep].log_softmax(-1)
    teacher_logp = model.logits(teacher)[keep].log_softmax(-1)
    want_kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    want_ce = torch.nn.functional.nll_loss(student_logp, labels[keep])
    assert want_kl > 1e-3  # the window matters for these tokens, so the teacher differs
    for chunk_rows in (1000, 7):
        terms = masked_loss(model, hidden, labels, chunk_rows=chunk_rows, teacher_hidden=teacher, distill_weight=0.25)
        torch.testing.assert_close(terms.kl, want_kl, atol=1e-12, rtol=0)
        torch.testing.assert_close(terms.cross_entropy, want_ce, atol=1e-12, rtol=0)
        torch.testing.assert_close(terms.loss, 0.75 * want_ce + 0.25 * want_kl, atol=1e-12, rtol=0)
    same = masked_loss(model, hidden, labels, teacher_hidden=hidden, distill_weight=1.0)
    assert abs(same.kl.item()) < 1e-12 and abs(same.loss.item()) < 1e-12
    with pytest.raises(ValueError, match="distill_weight"):
        masked_loss(model, hidden, labels, teacher_hidden=teacher, distill_weight=1.5)


def _lora_model(seed: int) -> tuple[FamModel, FamConfig, torch.nn.Parameter]:
    fam_cfg = FamConfig(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2)
    model = random_model(tiny_config(attention_bias=True), fam_cfg, seed=seed)
    apply_lora(model, ALL_TARGETS, rank=3, alpha=6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B starts at 0 (no gradient to A then): make both live
            m.lora_b.copy_(0.1 * torch.randn(m.lora_b.shape, generator=g, dtype=torch.float64))
    return model, fam_cfg, torch.nn.Parameter(torch.randn(3, 32, generator=g, dtype=torch.float64))


def _loss_and_grads(model, fam_cfg, prompt, tokens, labels, merge: bool, checkpoint: bool):
    for m in lora_modules(model).values():
        m.merge = merge
    model.zero_grad()
    prompt.grad = None
    out = forward_sequence(model, fam_cfg, tokens, fam_prompt=prompt, checkpoint=checkpoint)
    loss = masked_loss(model, out.hidden, labels).loss
    loss.backward()
    params = [prompt] + [p for m in lora_modules(model).values() for p in (m.lora_a, m.lora_b)]
    return loss.detach(), out.fam.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_merged_lora_equals_unmerged(checkpoint):
    """One matmul with W' = W + (B @ A) * scale and the low-rank backward give the three-matmul form's loss, FAM and
    gradients (to A, B and the prompt, through the FAM recurrence's repeated calls), also after an optimizer step
    has changed A and B in place (W' is formed again) and under activation checkpointing (recompute reuses W')."""
    model, fam_cfg, prompt = _lora_model(seed=12)
    tokens = torch.randint(0, 61, (2, 29), generator=torch.Generator().manual_seed(13))
    labels = torch.roll(tokens, -1, dims=1)
    params = [prompt] + [p for m in lora_modules(model).values() for p in (m.lora_a, m.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):
        plain = _loss_and_grads(model, fam_cfg, prompt, tokens, labels, merge=False, checkpoint=checkpoint)
        merged = _loss_and_grads(model, fam_cfg, prompt, tokens, labels, merge=True, checkpoint=checkpoint)
        torch.testing.assert_close(merged[0], plain[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(merged[1], plain[1], atol=1e-12, rtol=0)
        for got, want in zip(merged[2], plain[2]):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        optimizer.step()  # in place: bumps A's and B's versions, so the next forward merges again


def test_merged_weight_is_formed_once_per_step():
    model, fam_cfg, prompt = _lora_model(seed=14)
    tokens = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(15))
    for m in lora_modules(model).values():
        m.merge = True  # the default merges on GPUs and under autocast only
    module = lora_modules(model)["model.layers.0.mlp.up_proj"]
    out = forward_sequence(model, fam_cfg, tokens, fam_prompt=prompt, checkpoint=True)
    formed = module._merged
    masked_loss(model, out.hidden, tokens).loss.backward()  # the recompute calls up_proj 1 + 4 more times
    assert module._merged is formed
    with torch.no_grad():
        module.lora_b.add_(1.0)
    forward_sequence(model, fam_cfg, tokens, fam_prompt=prompt)
    assert module._merged is not formed
    want = module.base.weight + (module.lora_b @ module.lora_a) * module.scale
    torch.testing.assert_close(module._merged, want, atol=1e-14, rtol=0)


def test_merged_lora_under_bf16_autocast():
    """Under autocast W' is cached in bf16 (no per-call cast of the weight); its loss and gradients are as close to
    float32's as the textbook form's under autocast, and gradients keep the parameters' dtype."""
    model, fam_cfg, prompt = _lora_model(seed=16)
    model.to_device("cpu", torch.float32)
    prompt = torch.nn.Parameter(prompt.detach().float())
    tokens = torch.randint(0, 61, (2, 25), generator=torch.Generator().manual_seed(17))
    exact = _loss_and_grads(model, fam_cfg, prompt, tokens, tokens, merge=False, checkpoint=True)
    runs = {}
    for merge in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[merge] = _loss_and_grads(model, fam_cfg, prompt, tokens, tokens, merge=merge, checkpoint=True)
    assert lora_modules(model)["model.layers.1.self_attn.q_proj"]._merged.dtype == torch.bfloat16

    def worst_cosine(grads):
        return min(torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0) for g, w in
                   zip(grads, exact[2]))

    assert runs[True][0].item() == pytest.approx(exact[0].item(), rel=1e-2)
    assert runs[True][0].item() != exact[0].item()  # autocast did run in bf16
    assert all(g.dtype == torch.float32 for g in runs[True][2])
    assert worst_cosine(runs[True][2]) > min(0.95, worst_cosine(runs[False][2]) - 0.01)  # measured 0.974, 0.973


@pytest.mark.parametrize("lq,lk", [(5, 9), (6, 6), (4, 15)])
def test_bottom_right_causal_kernels_agree(lq, lk):
    """The CPU form (one boolean mask) and the GPU form (torch's bottom-right CausalBias, heads repeated for the
    memory-efficient kernel; on the CPU it materialises a mask) equal masked math attention, gradients included."""
    g = torch.Generator().manual_seed(lq * lk)
    q, k, v = (torch.randn(3, h, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h, n in ((4, lq), (2, lk), (2, lk)))
    mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # (Lq, Lk)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for fused_bias in (False, True):
        got = _causal_bottom_right(q, k, v, fused_bias=fused_bias)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        for g_got, g_want in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), want_grads):
            torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=0)


def _live_fam_lora(model: FamModel, seed: int) -> None:
    """FAM-row LoRA on every projection with random A and B (a fresh one has B = 0 and changes nothing)."""
    from famserve.engine.training.lora import apply_fam_lora

    apply_fam_lora(model, ALL_TARGETS, rank=3, alpha=6, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.fam_lora.layers:
            for b in layer.b.values():
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))


@pytest.mark.parametrize("fam", [dict(block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2),
                                 dict(block_size=5, memory_blocks=0, fam_length=4, sink_tokens=0)])
def test_fam_row_lora_sequence_equals_streaming_engine(fam):
    """LoRA on the FAM rows only (--lora-scope fam): the all-at-once path and the engine agree at 1e-9, FAM rows
    included, and the deltas change the logits (so the test would see them missing on either side)."""
    fam_cfg = FamConfig(mode="fam", **fam)
    model = random_model(tiny_config(), fam_cfg, seed=11)
    tokens = torch.randint(0, 61, (2, 29), generator=torch.Generator().manual_seed(12))
    without = sequence_logits(model, fam_cfg, tokens)
    _live_fam_lora(model, seed=13)
    model.requires_grad_(False)
    got = forward_sequence(model, fam_cfg, tokens)
    assert (model.logits(got.hidden) - without).abs().max() > 1e-3
    for row in range(2):
        state = model.new_state()
        want = ModelRunner(model).run([state], [tokens[row]], all_logits=True)[0]
        torch.testing.assert_close(model.logits(got.hidden[row]), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.fam[:, row], state.fam, atol=ATOL, rtol=0)


def test_fam_row_lora_leaves_tokens_on_the_base_weights():
    """BSWA (no FAM rows) is exactly the base model with FAM-row LoRA installed, and in FAM mode the first block
    of tokens differs from the base model only through the FAM keys they attend to: with the deltas, the gradient
    reaches A and B, never the frozen weights."""
    fam_cfg = FamConfig(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2)
    bswa_cfg = FamConfig(mode="bswa", block_size=6, memory_blocks=1, sink_tokens=2)
    model = random_model(tiny_config(), fam_cfg, seed=14)
    tokens = torch.randint(0, 61, (1, 25), generator=torch.Generator().manual_seed(15))
    before = sequence_logits(model, bswa_cfg, tokens)
    _live_fam_lora(model, seed=16)
    torch.testing.assert_close(sequence_logits(model, bswa_cfg, tokens), before, atol=0, rtol=0)

    labels = tokens.clone()
    masked_loss(model, forward_sequence(model, fam_cfg, tokens, checkpoint=True).hidden, labels).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("fam_lora."):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("tokens_take_lora", [True, False], ids=["every-row-lora", "fam-row-lora"])
@pytest.mark.parametrize("fam", [dict(block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2),
                                 dict(block_size=4, memory_blocks=2, fam_length=2, sink_tokens=1)])
def test_fam_after_window_sequence_equals_streaming_engine(fam, tokens_take_lora):
    """Under fam_after_window a fresh row's first M+1 blocks are BSWA with the base weights and the later ones
    read the FAM (through the LoRA too, for an every-row adapter): the all-at-once path and the engine agree at
    1e-9, and the first M+1 blocks equal BSWA of the base model exactly."""
    fam_cfg = FamConfig(mode="fam", fam_after_window=True, **fam)
    model = random_model(tiny_config(), fam_cfg, seed=21)
    tokens = torch.randint(0, 61, (2, 31), generator=torch.Generator().manual_seed(22))
    bswa = sequence_logits(model, FamConfig(mode="bswa", **{**fam, "fam_length": 0}), tokens)
    _live_fam_lora(model, seed=23)
    model.set_fam_lora(model.fam_lora, after_window=tokens_take_lora)
    model.requires_grad_(False)
    got = forward_sequence(model, fam_cfg, tokens)
    logits = model.logits(got.hidden)
    window = (fam_cfg.memory_blocks + 1) * fam_cfg.block_size
    torch.testing.assert_close(logits[:, :window], bswa[:, :window], atol=ATOL, rtol=0)
    assert (logits[:, window:] - bswa[:, window:]).abs().amax(-1).min() > 1e-6
    for row in range(2):
        state = model.new_state()
        want = ModelRunner(model).run([state], [tokens[row]], all_logits=True)[0]
        torch.testing.assert_close(logits[row], want, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.fam[:, row], state.fam, atol=ATOL, rtol=0)


def test_fam_after_window_carried_rows_read_the_fam_from_the_start():
    """A continuing row (Random State Passing) stands for a stream whose window moved on long ago: with M=0 and S=0
    it equals the engine continuing the stream (whose tokens all read the FAM and take the LoRA by then), while a
    fresh row in the same batch does not read it in its first block."""
    fam_cfg = FamConfig(mode="fam", block_size=5, memory_blocks=0, fam_length=3, sink_tokens=0, fam_after_window=True)
    model = random_model(tiny_config(), fam_cfg, seed=24)
    _live_fam_lora(model, seed=25)
    model.set_fam_lora(model.fam_lora, after_window=True)
    model.requires_grad_(False)
    first, second = torch.randint(0, 61, (2, 1, 15), generator=torch.Generator().manual_seed(26))
    carried = forward_sequence(model, fam_cfg, first).fam  # (N, 1, F, C)
    both = torch.cat([second, second])
    got = sequence_logits(model, fam_cfg, both, start_fam=carried.expand(-1, 2, -1, -1),
                          fresh=torch.tensor([False, True]))

    state, runner = model.new_state(), ModelRunner(model)
    runner.run([state], [first[0]])
    want = runner.run([state], [second[0]], all_logits=True)[0]
    torch.testing.assert_close(got[0], want, atol=ATOL, rtol=0)
    bswa = sequence_logits(model, FamConfig(mode="bswa", block_size=5, memory_blocks=0, sink_tokens=0), second)[0]
    torch.testing.assert_close(got[1, :5], bswa[:5], atol=ATOL, rtol=0)  # the fresh row's first block
    assert (got[0, :5] - bswa[:5]).abs().max() > 1e-3
