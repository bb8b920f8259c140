"""Exactness of the streaming FAM model: HF parity in full mode, chunking invariance, constant state size,
save/load, batch invariance. Tiny random Llama; tolerances are stated per test (fp32)."""

import hashlib
import json
import random
from dataclasses import asdict

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from famserve.engine.config import FamConfig, ModelConfig
from famserve.engine.errors import ContextLengthError, StateFormatError, StateMismatchError
from famserve.engine.fam_lora import TARGETS, FamLoRA
from famserve.engine.model import FamModel
from famserve.engine.runner import ModelRunner
from famserve.engine.state import FamState

ATOL = 2e-5  # fp32, 2 layers: observed differences are ~1e-7


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_theta=10000.0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def fam_model(hf, lora: bool = False, **fam) -> FamModel:
    """lora: with a random every-row LoRA that waits for the window (an adapter's, under fam_after_window)."""
    model = FamModel(ModelConfig.from_hf_config(hf.config.to_dict()), FamConfig(**fam))
    model.load_state_dict(hf.state_dict(), strict=True)
    if lora:
        g = torch.Generator().manual_seed(11)
        deltas = FamLoRA(model, TARGETS, rank=2, scale=1.0)
        deltas.init_a(g)
        with torch.no_grad():
            for layer in deltas.layers:
                for b in layer.b.values():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        model.set_fam_lora(deltas, after_window=True)
    return model.eval()


def run_chunks(model: FamModel, tokens: torch.Tensor, sizes) -> tuple[torch.Tensor, FamState]:
    """Feed `tokens` in chunks whose sizes come from the iterator `sizes`; return every position's logits."""
    runner, state, out, i = ModelRunner(model), model.new_state(), [], 0
    while i < len(tokens):
        n = min(next(sizes), len(tokens) - i)
        out.append(runner.run([state], [tokens[i:i + n]], all_logits=True)[0])
        i += n
    return torch.cat(out), state


def ones():
    while True:
        yield 1


def randoms(seed):
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, 11)


def whole():
    while True:
        yield 10**9


MODES = [
    dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2),
    dict(mode="fam", block_size=8, memory_blocks=0, fam_length=3, sink_tokens=0),
    dict(mode="bswa", block_size=8, memory_blocks=2, sink_tokens=4),
    dict(mode="bswa", block_size=8, memory_blocks=1, sink_tokens=0),
    dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2, fam_after_window=True),
    dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2, fam_after_window=True, lora=True),
]


def mode_id(fam: dict) -> str:
    late = "-late" if fam.get("fam_after_window") else ""
    return f"{fam['mode']}-M{fam['memory_blocks']}-S{fam['sink_tokens']}{late}{'-lora' if fam.get('lora') else ''}"


def test_full_mode_matches_hf_logits(hf_model):
    tokens = torch.randint(0, 128, (77,), generator=torch.Generator().manual_seed(1))
    model = fam_model(hf_model, mode="full", block_size=16, full_context_tokens=128)
    with torch.no_grad():
        expected = hf_model(tokens[None]).logits[0]
    got, _ = run_chunks(model, tokens, randoms(2))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fam", MODES, ids=mode_id)
def test_chunking_invariance(hf_model, fam):
    model = fam_model(hf_model, **fam)
    tokens = torch.randint(0, 128, (5 * 8 + 3,), generator=torch.Generator().manual_seed(3))
    ref, ref_state = run_chunks(model, tokens, whole())
    for sizes in (ones(), randoms(4), randoms(5)):
        got, state = run_chunks(model, tokens, sizes)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        assert state.num_tokens == ref_state.num_tokens and state.num_fam_updates == ref_state.num_fam_updates
        for name, t in ref_state.tensors().items():
            torch.testing.assert_close(state.tensors()[name], t, atol=ATOL, rtol=0, msg=name)


BSWA_WINDOWS = [MODES[2], MODES[3], dict(mode="bswa", block_size=8, memory_blocks=3, sink_tokens=8)]


@pytest.mark.parametrize("fam", BSWA_WINDOWS, ids=lambda f: f"M{f['memory_blocks']}-S{f['sink_tokens']}")
def test_bswa_reads_many_blocks_in_one_pass_exactly(hf_model, fam):
    """FamModel.prefill_blocks (whole blocks in one pass, which ModelRunner takes for one stream when its step
    budget is two blocks or more) == one block a step, in logits and state: from a fresh stream and mid-stream,
    from inside a block, with more and fewer new blocks than the ring holds, before and after the sinks move."""
    model = fam_model(hf_model, **fam)
    tokens = torch.randint(0, 128, (13 * 8,), generator=torch.Generator().manual_seed(6))
    ref, ref_state = run_chunks(model, tokens, ones())
    for cuts in ([0, 104], [0, 16, 104], [0, 8, 40, 64, 104], [0, 20, 104], [0, 24, 27, 104]):
        runner, state = ModelRunner(model, max_step_tokens=10**9, whole_blocks=True), model.new_state()
        got = torch.cat([runner.run([state], [tokens[a:b]], all_logits=True)[0] for a, b in zip(cuts, cuts[1:])])
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"logits, cuts {cuts}")
        assert state.num_tokens == ref_state.num_tokens
        for name, t in ref_state.tensors().items():
            torch.testing.assert_close(state.tensors()[name], t, atol=ATOL, rtol=0, msg=f"{name}, cuts {cuts}")
    last = ModelRunner(model, 32, whole_blocks=True).run([model.new_state()], [tokens])[0]  # 4 blocks a pass
    torch.testing.assert_close(last, ref[-1:], atol=ATOL, rtol=0)


def test_prefill_blocks_refuses_what_it_cannot_do_exactly(hf_model):
    fam = fam_model(hf_model, **MODES[0])
    with pytest.raises(ValueError, match="BSWA"):
        fam.prefill_blocks(fam.new_state(), torch.arange(16))
    bswa = fam_model(hf_model, **MODES[2])
    state = bswa.new_state()
    ModelRunner(bswa).run([state], [torch.arange(3)])
    with pytest.raises(ValueError, match="whole blocks"):
        bswa.prefill_blocks(state, torch.arange(16))  # the stream is 3 tokens into its block
    with pytest.raises(ValueError, match="whole blocks"):
        bswa.prefill_blocks(bswa.new_state(), torch.arange(5))  # not a whole block


@pytest.mark.parametrize("fam", MODES, ids=mode_id)
def test_decode_tokens_equals_a_step(hf_model, fam):
    """FamModel.decode_tokens (tensor-indexed, all K slots: what a CUDA graph replays) == a step of one token per
    stream, in logits and every state tensor, for three streams at different offsets, at every step all of them
    fit: before and after the window fills and the ring wraps. The tokens it refuses (sinks, a block's last
    token) are exactly those fits_decode_tokens names."""
    model = fam_model(hf_model, **fam)
    lay = model.layout
    runner = ModelRunner(model)
    states = [model.new_state() for _ in range(3)]
    for state, offset in zip(states, (0, 3, 13)):
        if offset:
            runner.run([state], [torch.arange(offset) % 128])
    gen, taken = torch.Generator().manual_seed(8), 0
    for _ in range(6 * lay.block_size):
        tokens = torch.randint(0, 128, (3,), generator=gen).tolist()
        for st in states:
            n = st.num_tokens
            assert model.fits_decode_tokens(st) == (n >= lay.num_sinks and n % lay.block_size != lay.block_size - 1)
        if all(model.fits_decode_tokens(st) for st in states):
            mine = [st.clone() for st in states]
            pos = [st.num_tokens for st in states]
            slot = [lay.block_slot(p // lay.block_size) + p % lay.block_size for p in pos]
            got = model.decode_tokens(mine, torch.tensor(tokens), torch.tensor(pos), torch.tensor(slot))
            expected = torch.cat(runner.run(states, [[t] for t in tokens]))
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"logits at {pos}")
            for m, st in zip(mine, states):
                for name, t in st.tensors().items():
                    torch.testing.assert_close(m.tensors()[name], t, atol=ATOL, rtol=0, msg=f"{name} at {pos}")
            taken += 1
        else:
            runner.run(states, [[t] for t in tokens])
    assert taken >= 3 * lay.block_size  # of 6 blocks of steps: each stream refuses its block-ending token


@pytest.mark.parametrize("fam", MODES, ids=mode_id)
def test_fill_block_equals_a_step(hf_model, fam):
    """FamModel.fill_block (a whole block, device-tensor indices, all K slots: what a CUDA graph replays) == a step
    of that block, in logits and every state tensor, block after block as the ring wraps, the sinks move and the
    FAM updates; fits_fill_block takes every block boundary from block max(1, M) on, and nothing else."""
    model = fam_model(hf_model, **fam)
    lay = model.layout
    runner, state = ModelRunner(model), model.new_state()
    tokens = torch.randint(0, 128, (8 * lay.block_size,), generator=torch.Generator().manual_seed(9))
    runner.run([state], [tokens[:3]])
    assert not model.fits_fill_block(state)  # inside a block
    runner.run([state], [tokens[3:lay.block_size]])
    taken = 0
    for block in range(1, 8):
        ids = tokens[block * lay.block_size:(block + 1) * lay.block_size]
        late = 1 if fam.get("fam_after_window") else 0  # the first block that reads the FAM is M+1
        assert model.fits_fill_block(state) == (block >= max(1, lay.memory_blocks) + late)
        if model.fits_fill_block(state):
            mine = state.clone()
            got = model.fill_block(mine, model.block_indices(mine, ids))
            mine.num_tokens += lay.block_size
            mine.num_fam_updates += 1 if lay.num_fam else 0
            expected = runner.run([state], [ids])[0]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"logits, block {block}")
            assert (mine.num_tokens, mine.num_fam_updates) == (state.num_tokens, state.num_fam_updates)
            for name, t in state.tensors().items():
                torch.testing.assert_close(mine.tensors()[name], t, atol=ATOL, rtol=0, msg=f"{name}, block {block}")
            taken += 1
        else:
            runner.run([state], [ids])
    assert taken >= 5


def test_memory_covering_input_without_fam_equals_full(hf_model):
    tokens = torch.randint(0, 128, (45,), generator=torch.Generator().manual_seed(6))
    full, _ = run_chunks(fam_model(hf_model, mode="full", block_size=8, full_context_tokens=64), tokens, whole())
    bswa, _ = run_chunks(fam_model(hf_model, mode="bswa", block_size=8, memory_blocks=6, sink_tokens=4),
                         tokens, randoms(7))
    torch.testing.assert_close(bswa, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["fam", "bswa"])
def test_state_bytes_do_not_grow(hf_model, mode):
    model = fam_model(hf_model, mode=mode, block_size=4, memory_blocks=1, fam_length=2, sink_tokens=1)
    runner, state = ModelRunner(model), model.new_state()
    runner.prefill(state, [torch.randint(0, 128, (40,))])
    after_10_blocks = state.nbytes
    runner.prefill(state, [torch.randint(0, 128, (396,)) for _ in range(10)])
    assert state.num_tokens == 4000
    assert state.nbytes == after_10_blocks


def greedy_continue(model, state, first_logits, n):
    runner, logits, out = ModelRunner(model), first_logits, []
    for _ in range(n):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = runner.decode([state], [token])
    return out


@pytest.mark.parametrize("fam", [*MODES[:3], MODES[-1]], ids=mode_id)
def test_save_load_continue(hf_model, fam, tmp_path):
    model = fam_model(hf_model, **fam)
    runner = ModelRunner(model)
    state = model.new_state()
    logits = runner.prefill(state, [torch.randint(0, 128, (29,), generator=torch.Generator().manual_seed(8))])
    path = tmp_path / "s.safetensors"
    state.save(path, "tiny", model.config, model.fam_config)
    loaded = FamState.load(path, model.config, model.fam_config)
    assert loaded.num_tokens == 29
    assert greedy_continue(model, loaded, logits, 20) == greedy_continue(model, state, logits, 20)


def test_load_refuses_other_config_and_corruption(hf_model, tmp_path):
    model = fam_model(hf_model, mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)
    state = model.new_state()
    data = state.to_bytes("tiny", model.config, model.fam_config)
    other_fam = FamConfig(mode="fam", block_size=16, memory_blocks=1, fam_length=4, sink_tokens=2)
    with pytest.raises(StateMismatchError, match="attention config"):
        FamState.from_bytes(data, model.config, other_fam)
    other_model = ModelConfig(**{**model.config.__dict__, "num_layers": 3})
    with pytest.raises(StateMismatchError, match="different architecture"):
        FamState.from_bytes(data, other_model, model.fam_config)
    with pytest.raises(StateFormatError, match="truncated"):
        FamState.from_bytes(data[:5], model.config, model.fam_config)
    with pytest.raises(StateFormatError):
        FamState.from_bytes(data[:len(data) // 2], model.config, model.fam_config)


def test_state_loads_where_the_tokenizer_names_other_special_tokens(hf_model):
    """Special-token ids come from the tokenizer library (two transformers versions read different eos ids from the
    same GGUF): a state saved under one reading loads under the other; a state saved before the ids were left out
    of the fingerprint (every field hashed) still loads on the same setup."""
    model = fam_model(hf_model, mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)
    state = model.new_state()
    other_reading = ModelConfig(**{**model.config.__dict__, "eos_token_ids": (2, 1), "bos_token_id": 7})
    assert other_reading.fingerprint() == model.config.fingerprint()
    data = state.to_bytes("tiny", other_reading, model.fam_config)
    assert FamState.from_bytes(data, model.config, model.fam_config).num_tokens == 0

    legacy = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode()).hexdigest()[:16]
    assert legacy != model.config.fingerprint() and model.config.matches_fingerprint(legacy)
    assert not other_reading.matches_fingerprint(legacy)  # the old form still tells the eos readings apart
    assert not ModelConfig(**{**model.config.__dict__, "num_layers": 3}).matches_fingerprint(legacy)


@pytest.mark.parametrize("fam", [*MODES[:3], MODES[-1]], ids=mode_id)
def test_batched_decode_equals_alone(hf_model, fam):
    """Streams at different partial-block offsets decoded together give each one's solo tokens."""
    model = fam_model(hf_model, **fam)
    runner = ModelRunner(model)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 8, 13, 22)]
    solo = []
    for p in prompts:
        state = model.new_state()
        solo.append(greedy_continue(model, state, runner.prefill(state, [p]), 15))
    states = [model.new_state() for _ in prompts]
    logits = torch.cat(runner.run(states, prompts))
    batched = [[] for _ in prompts]
    for _ in range(15):
        tokens = [int(t) for t in logits.argmax(-1)]
        for out, t in zip(batched, tokens):
            out.append(t)
        logits = runner.decode(states, tokens)
    assert batched == solo


def test_full_mode_refuses_past_its_context(hf_model):
    model = fam_model(hf_model, mode="full", block_size=8, full_context_tokens=16)
    state = model.new_state()
    ModelRunner(model).prefill(state, [list(range(16))])
    with pytest.raises(ContextLengthError):
        ModelRunner(model).decode([state], [1])
