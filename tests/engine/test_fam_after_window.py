"""FamConfig.fam_after_window: a stream is BSWA with the base weights, exactly, until a block leaves its window, and
then reads the FAM through the adapter's LoRA; the adapter file says whether it was trained so, and brings that to
the engine like its L, M and S. (Chunking, decode and whole-block paths under it: tests/engine/test_model.py.)"""

import json
import logging

import pytest
import torch
from safetensors.torch import load, save

from famserve.engine.adapter import FamAdapter
from famserve.engine.build import load_model, requested_fam
from famserve.engine.config import FamConfig
from famserve.engine.errors import CheckpointError, StateMismatchError
from famserve.engine.runner import ModelRunner
from famserve.engine.state import FamState, read_metadata

ATOL = 2e-5
L, M = 8, 1


def write_adapter(tiny_llama_dir, path, after_window: bool, fam_rows_too: bool = False) -> FamAdapter:
    """A random adapter for the tiny model: a FAM prompt and LoRA on every projection of every layer."""
    model = load_model(tiny_llama_dir, FamConfig(mode="bswa")).model
    g = torch.Generator().manual_seed(5)
    lora = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            lora[name] = (torch.randn(2, module.in_features, generator=g) * 0.2,
                          torch.randn(module.out_features, 2, generator=g) * 0.2)
    fam_lora = {n: (a.clone(), b.clone()) for n, (a, b) in list(lora.items())[:2]} if fam_rows_too else {}
    adapter = FamAdapter(torch.randn(4, model.config.hidden_size, generator=g), model.config.fingerprint(), "tiny",
                         L, M, 2, lora, 1.0, fam_lora, fam_after_window=after_window)
    adapter.save(path)
    return adapter


def logits(model, tokens):
    return ModelRunner(model).run([model.new_state()], [tokens], all_logits=True)[0]


def test_inside_the_window_the_stream_is_bswa_of_the_base_model_exactly(tiny_llama_dir, tmp_path):
    path = tmp_path / "late.safetensors"
    write_adapter(tiny_llama_dir, path, after_window=True)
    tokens = torch.randint(0, 320, (5 * L,), generator=torch.Generator().manual_seed(1))
    late = load_model(tiny_llama_dir, FamConfig(mode="fam", block_size=L, memory_blocks=M, fam_length=4,
                                                sink_tokens=2, fam_after_window=True), adapter_path=path).model
    base = load_model(tiny_llama_dir, FamConfig(mode="bswa", block_size=L, memory_blocks=M, sink_tokens=2)).model
    always = load_model(tiny_llama_dir, FamConfig(mode="fam", block_size=L, memory_blocks=M, fam_length=4,
                                                  sink_tokens=2), adapter_path=path).model
    got, want, merged = logits(late, tokens), logits(base, tokens), logits(always, tokens)
    window = (M + 1) * L  # blocks 0..M: nothing has left the window yet
    torch.testing.assert_close(got[:window], want[:window], atol=ATOL, rtol=0)
    assert (merged[:window] - want[:window]).abs().max() > 0.1  # the adapter does change the tokens when merged
    assert (got[window:] - want[window:]).abs().amax(-1).min() > 1e-3  # every later token reads the FAM and LoRA
    for name, p in late.named_parameters():  # the LoRA was not merged: the window's tokens need the base weights
        if not name.startswith("fam_lora."):
            torch.testing.assert_close(p, dict(base.named_parameters())[name], atol=0, rtol=0)
    assert late.lora_after_window and not always.lora_after_window


def test_the_adapter_brings_fam_after_window_unless_told_otherwise(tiny_llama_dir, tmp_path, caplog):
    path = tmp_path / "late.safetensors"
    write_adapter(tiny_llama_dir, path, after_window=True)
    assert FamAdapter.load(path).fam_after_window and not FamAdapter.load(path).lora == {}
    fam, unset = requested_fam(fam_length=4)
    assert "fam_after_window" in unset
    model = load_model(tiny_llama_dir, fam, adapter_path=path, shape_from_adapter=unset).model
    assert model.fam_config.fam_after_window and model.fam_config.gates_fam and model.lora_after_window
    assert "FAM read after the window" in model.fam_config.describe()
    fam, unset = requested_fam(fam_after_window=False, fam_length=4)
    with caplog.at_level(logging.WARNING):
        model = load_model(tiny_llama_dir, fam, adapter_path=path, shape_from_adapter=unset).model
    assert not model.fam_config.fam_after_window and not model.lora_after_window
    assert "trained with L=8 M=1 S=2 (FAM read after the window), running with L=8 M=1 S=2:" in caplog.text


def test_an_adapter_with_both_kinds_of_lora_is_refused_after_the_window(tiny_llama_dir, tmp_path):
    path = tmp_path / "both.safetensors"
    write_adapter(tiny_llama_dir, path, after_window=True, fam_rows_too=True)
    fam = FamConfig(mode="fam", block_size=L, memory_blocks=M, fam_length=4, sink_tokens=2, fam_after_window=True)
    with pytest.raises(CheckpointError, match="fam_after_window supports one kind at a time"):
        load_model(tiny_llama_dir, fam, adapter_path=path)


def test_states_saved_before_the_field_existed_still_load(tiny_llama_dir):
    model = load_model(tiny_llama_dir, FamConfig(mode="bswa", block_size=L, memory_blocks=M)).model
    state = model.new_state()
    ModelRunner(model).run([state], [torch.arange(11)])
    data = state.to_bytes("tiny", model.config, model.fam_config)
    meta = read_metadata(data)
    old = json.loads(meta["fam_config"])
    del old["fam_after_window"]
    meta["fam_config"] = json.dumps(old)
    legacy = save(load(data), metadata=meta)
    assert FamState.from_bytes(legacy, model.config, model.fam_config).num_tokens == 11
    late = FamConfig(mode="bswa", block_size=L, memory_blocks=M, fam_after_window=True)
    with pytest.raises(StateMismatchError, match="attention config"):
        FamState.from_bytes(legacy, model.config, late)


@pytest.mark.model
def test_the_shipped_adapter_answers_inside_its_window_as_bswa_does(smollm2_path):
    """The adapter famserve ships for smollm2-135m (FAM mode's default there) reads the FAM after the window: a
    short chat question, asked and answered inside the first block, gets BSWA's logits at the same L, M, S exactly
    (float32), and the first tokens of the next block already differ (FAM and LoRA at work)."""
    from famserve.engine.build import shipped_fam_adapter

    path = shipped_fam_adapter("smollm2-135m", "fam")
    adapter = FamAdapter.load(path)
    assert adapter.fam_after_window and adapter.memory_blocks == 0
    fam, unset = requested_fam(fam_length=adapter.fam_length)
    late = load_model("smollm2-135m", fam, "fam", adapter_path=path, shape_from_adapter=unset)
    shape = dict(block_size=adapter.block_size, memory_blocks=adapter.memory_blocks, sink_tokens=adapter.sink_tokens)
    base = load_model("smollm2-135m", FamConfig(mode="bswa", **shape)).model
    prompt = late.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    answer = late.tokenizer.encode("The capital of France is Paris. " * 12)
    tokens = torch.tensor(prompt + answer[:80])
    got, want = logits(late.model, tokens), logits(base, tokens)
    inside = adapter.block_size * (adapter.memory_blocks + 1)
    assert len(prompt) < inside
    torch.testing.assert_close(got[:inside], want[:inside], atol=1e-4, rtol=0)
    assert (got[inside:inside + 8] - want[inside:inside + 8]).abs().max() > 0.1
