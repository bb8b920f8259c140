"""The tiny random Llama the tests build (HF folder with a real byte-level BPE tokenizer and ChatML template, GGUF
files): importable by name, since test modules cannot import from conftest.py (several folders define one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
TINY_VOCAB_SIZE = 320  # 256 byte symbols + 3 special tokens + 61 merges
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Feedback attention memory lets a transformer read long contexts.",
    "user: what is the capital of France? assistant: The capital of France is Paris.",
    "system: you are a helpful assistant. Answer briefly, in one sentence.",
]


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """An HF LlamaConfig dict: 2 layers, C=64, H=4, Hkv=2, D=16, SwiGLU 128, vocab 320."""
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    return config


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE (tokenizers library) trained on a few sentences: deterministic, offline, 320 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_TINY_CORPUS * 3, trainer)
    assert tokenizer.get_vocab_size() == TINY_VOCAB_SIZE, "corpus too small for the merges we ask for"
    return tokenizer


def make_tiny_model(**overrides: Any) -> torch.nn.Module:
    """A transformers causal LM of tiny_config_dict(**overrides) with seeded random weights (eval, float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = tiny_config_dict(**overrides)
    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():  # the default init leaves norms at exactly 1 and biases at 0; make them informative
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_tiny_folder(model: torch.nn.Module, folder: Path, max_shard_size: str | None = None) -> Path:
    """Save model + tiny tokenizer as an HF folder (config.json, model.safetensors, tokenizer.json, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    build_tiny_tokenizer().save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                        "model_max_length": 2048, "chat_template": TINY_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return folder


def gguf_permute_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter order for Q/K rows: per head, (half, pair) -> (pair, half)."""
    head_dim = values.shape[0] // num_heads
    return values.reshape(num_heads, 2, head_dim // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def write_tiny_gguf(path: Path, folder: Path, qtype: str = "F32", arch: str | None = None,
                    rope_freqs: np.ndarray | None = None) -> Path:
    """Write the weights of an HF folder as llama.cpp would: GGUF names, Q/K rows permuted (llama arch), 2-D
    weights in `qtype` (norms stay F32), plus tokenizer metadata and chat template."""
    import gguf
    from gguf import GGMLQuantizationType, quants
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    arch = arch or config["model_type"]
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _add_tokenizer_metadata(writer, folder)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf_name, tensor in weights.items():
        name = _gguf_name(hf_name)
        values = tensor.float().numpy()
        module = name.split(".")[2] if name.startswith("blk.") else ""
        if arch == "llama" and module in heads:  # weights and biases alike, as llama.cpp's converter does
            values = gguf_permute_rows(values, heads[module])
        kind = GGMLQuantizationType[qtype] if values.ndim == 2 else GGMLQuantizationType.F32
        try:
            data = quants.quantize(values, kind)
        except NotImplementedError:  # a type gguf cannot write (for error tests): zero blocks of the right size
            data = np.zeros(quants.quant_shape_to_byte_shape(values.shape, kind), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer_metadata(writer: Any, folder: Path) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
