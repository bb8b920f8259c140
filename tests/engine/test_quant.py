"""Weight-only int4 for decode (engine/quant.py): Q4_1's rounding, the kernel against the dense copy, the switch
between them, and a quantized model whose prompt and decode paths agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import EngineConfig, FamConfig
from famserve.engine.quant import GROUP, MAX_INT4_ROWS, Int4DecodeLinear, Int4Weight, int4_kernel_available
from famserve.engine.runner import ModelRunner

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="this torch has no CPU int4 kernel")


def q4_1_weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) float32 weights as a Q4_1 file dequantizes them: per group of 32, d * q + m with fp16 d and m and
    codes 0..15, each group holding both 0 and 15 (Q4_1's quantizer maps the group's min and max there)."""
    g = torch.Generator().manual_seed(seed)
    groups = n * k // GROUP
    d = (torch.rand(groups, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (torch.randn(groups, 1, generator=g) * 0.1).half().float()
    codes = torch.randint(0, 16, (groups, GROUP), generator=g)
    codes[:, 0], codes[:, 1] = 0, 15
    return (d * codes + m).reshape(n, k)


def test_q4_1_weights_keep_their_values():
    w = q4_1_weights(64, 128)
    int4, dense = Int4Weight.quantize(w, torch.bfloat16)
    assert dense.dtype == torch.bfloat16 and dense.shape == w.shape
    # the codes come back; what moves is bfloat16's rounding of each group's scale and offset, and of the weight
    error = (dense.float() - w).abs().max()
    assert error <= 2**-7 * w.abs().max(), error
    x = torch.randn(3, 128).bfloat16()
    reference = x.float() @ w.T
    assert torch.allclose(int4.matmul(x).float(), reference, atol=0.02 * reference.abs().max())


def test_kernel_computes_with_the_dense_copy():
    int4, dense = Int4Weight.quantize(torch.randn(48, 96), torch.bfloat16)
    x = torch.randn(MAX_INT4_ROWS, 96).bfloat16()
    by_kernel, by_dense = int4.matmul(x).float(), (x.float() @ dense.float().T)
    assert torch.allclose(by_kernel, by_dense, atol=1e-2 * by_dense.abs().max())


def test_few_rows_read_the_int4_copy_and_more_rows_the_dense_weights():
    layer = Int4DecodeLinear.from_linear(torch.nn.Linear(64, 32, bias=True), torch.bfloat16)
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    x = torch.randn(MAX_INT4_ROWS + 1, 64).bfloat16()
    with torch.no_grad():
        expected = layer(x)  # dense
        assert torch.allclose(layer(x[:MAX_INT4_ROWS]).float(), expected[:MAX_INT4_ROWS].float(), atol=0.03)
        layer.weight.zero_()  # the dense weights no longer match the int4 copy: each path shows which it read
        assert torch.equal(layer(x), layer.bias.expand(MAX_INT4_ROWS + 1, -1))
        assert torch.allclose(layer(x[:1]).float(), expected[:1].float(), atol=0.03)


def test_engine_config_asks_for_the_cpu_in_bfloat16():
    assert EngineConfig(device="cpu", dtype="auto", quantize="int4").dtype == "bfloat16"  # auto means bfloat16
    with pytest.raises(ValueError, match="bfloat16"):
        EngineConfig(device="cpu", dtype="float32", quantize="int4")
    with pytest.raises(ValueError, match="CPU"):
        EngineConfig(device="cuda", dtype="bfloat16", quantize="int4")
    with pytest.raises(ValueError, match="quantize"):
        EngineConfig(quantize="int3")


def test_quantized_model_decodes_as_it_prefills(tiny_llama_dir):
    """Token by token (int4 kernel, one row a step) and the whole prompt at once (the dense copy) read one model."""
    fam = FamConfig(mode="bswa", block_size=8, memory_blocks=2, sink_tokens=2)
    loaded = load_model(tiny_llama_dir, fam, "bswa", EngineConfig(device="cpu", dtype="bfloat16", quantize="int4"))
    model = loaded.model
    projections = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert projections and all(isinstance(m, Int4DecodeLinear) for m in projections)
    assert type(model.lm_head) is torch.nn.Linear  # the output projection keeps its precision
    runner = ModelRunner(model)
    ids = torch.randint(3, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = runner.prefill(model.new_state(), [ids], all_logits=True)
        state = model.new_state()
        stepped = torch.cat([runner.run([state], [ids[i:i + 1]])[0] for i in range(len(ids))])
    assert whole.shape == stepped.shape == (40, model.config.vocab_size)
    assert torch.allclose(stepped, whole, atol=0.02 * whole.abs().max()), (stepped - whole).abs().max()

    dense = load_model(tiny_llama_dir, fam, "bswa", EngineConfig(device="cpu", dtype="bfloat16")).model
    with torch.inference_mode():
        unquantized = ModelRunner(dense).prefill(dense.new_state(), [ids], all_logits=True)
    assert not torch.allclose(unquantized, whole, atol=1e-3)  # the weights were rounded to 4 bits


@pytest.mark.model
def test_smollm2_q4_1_projection_round_trips(smollm2_checkpoint):
    """The default model's projections are Q4_1 in its GGUF file: quantized again, they keep their values."""
    w = smollm2_checkpoint.weights["model.layers.0.mlp.gate_proj.weight"]
    int4, dense = Int4Weight.quantize(w, torch.bfloat16)
    assert (dense.float() - w).abs().max() <= 2**-7 * w.abs().max()
    x = torch.randn(1, w.shape[1]).bfloat16()
    reference = x.float() @ w.T
    assert torch.allclose(int4.matmul(x).float(), reference, atol=0.01 * reference.abs().max())


@pytest.mark.model
def test_smollm2_decodes_text_from_int4_weights_as_well_as_from_bfloat16(smollm2_path):
    """Perplexity over a page of English read one token a step (the int4 kernel's path) against the bfloat16
    model's: the file's own 4-bit weights, read as they are, lose next to nothing (bfloat16 scales round them)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    perplexity = {}
    for quantize in ("none", "int4"):
        loaded = load_model(smollm2_path, engine=EngineConfig(device="cpu", dtype="bfloat16", quantize=quantize))
        ids = torch.tensor(loaded.tokenizer.encode(text)[:200])
        runner, state = ModelRunner(loaded.model), loaded.model.new_state()
        with torch.inference_mode():
            logits = torch.cat([runner.run([state], [ids[i:i + 1]])[0] for i in range(len(ids) - 1)])
        perplexity[quantize] = torch.exp(torch.nn.functional.cross_entropy(logits.float(), ids[1:])).item()
    assert perplexity["int4"] < 1.03 * perplexity["none"], perplexity
