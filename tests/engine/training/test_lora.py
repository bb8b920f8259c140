"""Own LoRA (engine/training/lora.py): a fresh wrap changes nothing; an exported adapter, saved and loaded with
load_model(adapter_path=...), merges into the same logits the wrapped model computes; a different base model is
refused. fp32, tolerance 2e-5 (observed ~1e-6)."""

import pytest
import torch

from tiny_models import make_tiny_model, save_tiny_folder
from famserve.engine.adapter import FamAdapter
from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.errors import CheckpointError
from famserve.engine.runner import ModelRunner
from famserve.engine.training.lora import ALL_TARGETS, apply_lora, export_adapter, lora_modules, lora_parameters
from famserve.engine.training.sequence import sequence_logits

ATOL = 2e-5
FAM = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)


def test_fresh_lora_computes_the_base_model(tiny_llama_dir):
    model = load_model(tiny_llama_dir, FAM, mode="bswa").model
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(0))
    before = sequence_logits(model, FAM, tokens)
    wrapped = apply_lora(model, ["q_proj", "up_proj"], rank=4, alpha=8)
    assert wrapped == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.up_proj", "self_attn.q_proj")]
    assert len(lora_parameters(model)) == 8 and all(p.requires_grad for p in lora_parameters(model))
    assert sum(p.requires_grad for p in model.parameters()) == 8  # everything else frozen
    torch.testing.assert_close(sequence_logits(model, FAM, tokens), before, atol=0, rtol=0)


def test_unknown_target_is_refused(tiny_llama_dir):
    model = load_model(tiny_llama_dir, FAM, mode="bswa").model
    with pytest.raises(ValueError, match="lora_targets: unknown module names \\['qkv'\\]"):
        apply_lora(model, ["qkv"])


def test_saved_adapter_merges_to_the_wrapped_models_logits(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir, FAM, mode="bswa")
    model = loaded.model
    apply_lora(model, ALL_TARGETS, rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)
    prompt = torch.randn(4, 64, generator=g)
    tokens = torch.randint(0, 320, (1, 37), generator=g)  # 4 whole blocks and a partial one
    want = sequence_logits(model, FAM, tokens, fam_prompt=prompt)[0]

    path = tmp_path / "adapter.safetensors"
    export_adapter(model, prompt, loaded.model_id, FAM).save(path)
    adapter = FamAdapter.load(path)
    assert (adapter.block_size, adapter.memory_blocks, adapter.sink_tokens, adapter.fam_length) == (8, 1, 2, 4)
    assert adapter.lora_scale == 2.0 and len(adapter.lora) == 14
    assert adapter.base_fingerprint == model.config.fingerprint()

    merged = load_model(tiny_llama_dir, FAM, adapter_path=path)  # mode: fam, since an adapter is given
    assert merged.fam_trained and merged.model.fam_config.mode == "fam"
    state = merged.model.new_state()
    got = ModelRunner(merged.model).run([state], [tokens[0]], all_logits=True)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_adapter_for_another_base_model_is_refused(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir, FAM, mode="bswa")
    apply_lora(loaded.model, ["q_proj"], rank=2, alpha=2)
    path = tmp_path / "adapter.safetensors"
    export_adapter(loaded.model, torch.zeros(4, 64), loaded.model_id, FAM).save(path)
    other = save_tiny_folder(make_tiny_model(intermediate_size=96), tmp_path / "other")
    with pytest.raises(CheckpointError, match="FAM adapter was trained for"):
        load_model(other, FAM, adapter_path=path)


@pytest.mark.parametrize("token_targets", [(), ("q_proj",)], ids=["fam-rows", "fam-rows+token-q"])
def test_saved_fam_row_adapter_installs_unmerged(tiny_llama_dir, tmp_path, token_targets):
    """An adapter trained with --lora-scope fam saves its deltas apart, and loading it gives the engine the trained
    model's FAM-mode logits while its BSWA stays the base model's (the token weights are not touched); with token
    LoRA too (--token-lora-targets) that part is merged and the engine still computes the trained model."""
    from famserve.engine.training.lora import apply_fam_lora

    loaded = load_model(tiny_llama_dir, FAM, mode="bswa")
    model = loaded.model
    bswa = FamConfig(mode="bswa", block_size=8, memory_blocks=1, sink_tokens=2)
    tokens = torch.randint(0, 320, (1, 37), generator=torch.Generator().manual_seed(3))
    base_bswa = sequence_logits(model, bswa, tokens)[0]
    if token_targets:
        apply_lora(model, token_targets, rank=4, alpha=8)
    apply_fam_lora(model, ["q_proj", "k_proj", "v_proj", "up_proj"], rank=4, alpha=8, seed=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.fam_lora.layers:
            for b in layer.b.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)
    assert all(p.requires_grad == ("lora_" in n or n.startswith("fam_lora.")) for n, p in model.named_parameters())
    prompt = torch.randn(4, 64, generator=g)
    want = sequence_logits(model, FAM, tokens, fam_prompt=prompt)[0]

    path = tmp_path / "fam-rows.safetensors"
    export_adapter(model, prompt, loaded.model_id, FAM).save(path)
    adapter = FamAdapter.load(path)
    assert len(adapter.lora) == 2 * len(token_targets) and len(adapter.fam_lora) == 8 and adapter.lora_scale == 2.0

    served = load_model(tiny_llama_dir, FAM, adapter_path=path).model
    got = ModelRunner(served).run([served.new_state()], [tokens[0]], all_logits=True)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if not token_targets:
        as_bswa = load_model(tiny_llama_dir, FAM, mode="bswa", adapter_path=path).model
        got_bswa = ModelRunner(as_bswa).run([as_bswa.new_state()], [tokens[0]], all_logits=True)[0]
        torch.testing.assert_close(got_bswa, base_bswa, atol=ATOL, rtol=0)
