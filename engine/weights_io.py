"""Reading weight files into tensors named as in HF Llama checkpoints: safetensors (single or sharded) and GGUF
(metadata, dequantization, llama.cpp's tensor names and its RoPE row permutation undone)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from famserve.engine.config import RopeScaling
from famserve.engine.errors import CheckpointError

logger = logging.getLogger(__name__)

# GGUF architectures we read, and whether llama.cpp's converter permuted their Q/K rows (it does for "llama",
# which also covers Mistral files; Qwen2 keeps the HF row order).
GGUF_ARCHITECTURES = {"llama": True, "qwen2": False}

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style frequency factors, stored as a tensor by llama.cpp


# ---------------------------------------------------------------------------------------------- safetensors


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it, for model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        return {name: single for name in _safetensors_keys(single, safe_open)}
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors weights are supported)")


def _safetensors_keys(path: Path, safe_open: Any) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as exc:  # SafetensorError for a truncated or corrupt header, OSError for unreadable files
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc


def read_safetensors(files: dict[str, Path], names: Iterable[str], dtype: torch.dtype,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each file once and converting each tensor as it is read (the whole model
    never exists twice in memory)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: shard file is missing (named in model.safetensors.index.json)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in file_names:
                    out[name] = _convert(f.get_tensor(name), dtype, device)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc
    return out


def _convert(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


# ---------------------------------------------------------------------------------------------- GGUF


class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, and the reader's tensor table."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
            self.metadata: dict[str, Any] = {key: _field_value(field, gguf.GGUFValueType)
                                             for key, field in self._reader.fields.items()}
        except Exception as exc:  # GGUFReader raises ValueError, IndexError, struct errors... on bad input
            raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from exc
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.architecture = str(self.metadata.get("general.architecture", ""))

    def hf_config_dict(self) -> dict[str, Any]:
        """The metadata as the fields of an HF config.json, for ModelConfig.from_hf_config."""
        arch, md = self.architecture, self.metadata
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported "
                                  f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise CheckpointError(f"{self.path}: tensor token_embd.weight is missing")
        try:
            heads = int(md[f"{arch}.attention.head_count"])
            cfg: dict[str, Any] = {
                "model_type": arch,
                "vocab_size": int(embed.shape[1]),  # GGUF lists dimensions innermost first: (hidden, vocab)
                "hidden_size": int(md[f"{arch}.embedding_length"]),
                "intermediate_size": int(md[f"{arch}.feed_forward_length"]),
                "num_hidden_layers": int(md[f"{arch}.block_count"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(md.get(f"{arch}.attention.head_count_kv", heads)),
                "head_dim": md.get(f"{arch}.attention.key_length"),
                "rms_norm_eps": float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                "rope_theta": float(md.get(f"{arch}.rope.freq_base", 10000.0)),
                "max_position_embeddings": int(md.get(f"{arch}.context_length", 4096)),
                "tie_word_embeddings": "output.weight" not in self.tensors,
                "attention_bias": "blk.0.attn_q.bias" in self.tensors,
                "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": self._eos_ids(),
            }
        except KeyError as exc:
            raise CheckpointError(f"{self.path}: GGUF metadata key {exc.args[0]} is missing") from exc
        cfg["rope_scaling"] = self._rope_scaling_dict(cfg)
        return cfg

    def _eos_ids(self) -> list[int]:
        # End-of-turn tokens (Llama 3's <|eot_id|>) end a reply just as end-of-sequence does.
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        ids = [int(self.metadata[k]) for k in keys if k in self.metadata]
        return list(dict.fromkeys(ids))

    def _rope_scaling_dict(self, cfg: dict[str, Any]) -> dict[str, Any] | None:
        # "linear" is supported; ModelConfig refuses "yarn" and "longrope" with a clear message.
        prefix = f"{self.architecture}.rope.scaling"
        kind = self.metadata.get(f"{prefix}.type")
        if kind in ("linear", "yarn", "longrope"):
            return {"rope_type": kind, "factor": float(self.metadata.get(f"{prefix}.factor", 1.0))}
        if _ROPE_FREQS in self.tensors:
            head_dim = cfg["head_dim"] or cfg["hidden_size"] // cfg["num_attention_heads"]
            factors = self.dequantize(self.tensors[_ROPE_FREQS])
            scaling = llama3_scaling_from_factors(factors, cfg["rope_theta"], head_dim)
            if scaling is None:
                raise CheckpointError(f"{self.path}: its {_ROPE_FREQS} tensor matches no Llama 3 RoPE scaling we know")
            return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                    "high_freq_factor": scaling.high_freq_factor,
                    "original_max_position_embeddings": scaling.original_max_position_embeddings}
        return None

    def dequantize(self, tensor: Any) -> np.ndarray:
        """The tensor as float32 in torch dimension order (outermost first)."""
        from gguf import quants

        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{self.path}: tensor {tensor.name} uses quantization type "
                                  f"{tensor.tensor_type.name}, which the installed gguf package cannot "
                                  "dequantize") from exc
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            values = values.reshape(shape)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: tensor {tensor.name} is truncated "
                                  f"({values.size} values for shape {shape})") from exc
        return values if values.flags.writeable else values.copy()  # a read-only view of the file mapping

    def read_tensors(self, num_kv_heads: int, num_heads: int, dtype: torch.dtype,
                     device: torch.device) -> dict[str, torch.Tensor]:
        """Every tensor under its HF name, dequantized, Q/K rows restored to the HF order."""
        permuted = GGUF_ARCHITECTURES[self.architecture]
        out: dict[str, torch.Tensor] = {}
        unknown = []
        for name, tensor in self.tensors.items():
            hf_name = hf_name_for_gguf(name)
            if hf_name is None:
                if name != _ROPE_FREQS:
                    unknown.append(name)
                continue
            values = self.dequantize(tensor)
            if permuted and ".q_proj." in hf_name:
                values = unpermute_rope_rows(values, num_heads)
            elif permuted and ".k_proj." in hf_name:
                values = unpermute_rope_rows(values, num_kv_heads)
            out[hf_name] = _convert(torch.from_numpy(values), dtype, device)
        if unknown:
            logger.warning("%s: ignoring %d tensors we do not use: %s", self.path, len(unknown),
                           ", ".join(unknown[:5]))
        return out


def _field_value(field: Any, value_types: Any) -> Any:
    """One metadata field as a Python value (strings decoded, arrays as lists)."""
    def scalar(part: np.ndarray, kind: Any) -> Any:
        if kind == value_types.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part[0].item()

    if not field.types:
        return None
    if field.types[0] == value_types.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def hf_name_for_gguf(name: str) -> str | None:
    """llama.cpp's tensor name -> the HF Llama name, or None for a tensor we do not use."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_BLOCK.fullmatch(name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rope_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. Its converter stores, per head, the even rotary rows then the odd ones
    (interleaved RoPE); HF keeps the two halves apart. Rows go back from (head, pair, half) to (head, half, pair)."""
    rows = values.shape[0]
    head_dim = rows // num_heads
    grouped = values.reshape(num_heads, head_dim // 2, 2, *values.shape[1:])  # (H, D/2, 2, C)
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(values.shape)  # (H, 2, D/2, C) -> (H*D, C)


# Llama 3.x checkpoints scale RoPE with these (low, high, original context) and a model-specific factor.
_LLAMA3_CANDIDATES = ((1.0, 4.0, 8192),)


def llama3_rope_factors(scaling: RopeScaling, rope_theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs for a Llama 3 RoPE scaling."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    middle = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, scaling.factor, middle))


def llama3_scaling_from_factors(factors: np.ndarray, rope_theta: float, head_dim: int) -> RopeScaling | None:
    """Recover the Llama 3 scaling parameters from stored factors: the factor is their maximum, the rest must be
    one of the known settings (checked by recomputing every factor)."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2:
        return None
    for low, high, original in _LLAMA3_CANDIDATES:
        scaling = RopeScaling("llama3", float(round(factors.max(), 4)), low, high, original)
        if np.allclose(llama3_rope_factors(scaling, rope_theta, head_dim), factors, rtol=1e-3):
            return scaling
    return None
