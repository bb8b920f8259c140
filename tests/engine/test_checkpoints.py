"""The engine on real checkpoint files: GGUF and safetensors give the same logits, and full mode equals HF
transformers on SmolLM2 (marked `model`)."""

from pathlib import Path

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.runner import ModelRunner

FULL = FamConfig(mode="full", block_size=64, full_context_tokens=512)
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 3


def hf_llama(ckpt):
    """transformers' LlamaForCausalLM with a loaded checkpoint's shape and weights (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = ckpt.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids))).eval()
    hf.load_state_dict(ckpt.weights, strict=False)
    return hf


def logits_of(spec, tokens, fam=FULL, mode="full"):
    loaded = load_model(spec, fam, mode)
    return ModelRunner(loaded.model).prefill(loaded.model.new_state(), [tokens], all_logits=True)


@pytest.mark.parametrize("qtype,atol", [("F32", 1e-5), ("F16", 2e-2), ("Q8_0", 5e-2)])
def test_tiny_gguf_and_folder_give_the_same_logits(tiny_llama_dir, tiny_gguf_factory, qtype, atol):
    tokens = torch.randint(3, 300, (90,), generator=torch.Generator().manual_seed(0))
    from_folder = logits_of(tiny_llama_dir, tokens)
    from_gguf = logits_of(tiny_gguf_factory(qtype), tokens)
    torch.testing.assert_close(from_gguf, from_folder, atol=atol, rtol=0)


@pytest.mark.model
def test_smollm2_full_mode_matches_hf_transformers(smollm2_checkpoint):
    ckpt = smollm2_checkpoint
    hf = hf_llama(ckpt)
    tokens = torch.tensor(ckpt.tokenizer.encode(TEXT))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
    got = logits_of("smollm2-135m", tokens)
    # fp32 through 30 layers on logits of order 10-30: observed max difference ~1e-4.
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


@pytest.mark.model
def test_smollm2_gguf_and_safetensors_folder_agree(smollm2_checkpoint, tmp_path: Path):
    ckpt = smollm2_checkpoint
    hf = hf_llama(ckpt)
    hf.save_pretrained(tmp_path)  # a plain HF folder: config.json + model.safetensors
    ckpt.tokenizer.hf_tokenizer.save_pretrained(tmp_path)
    tokens = torch.tensor(ckpt.tokenizer.encode(TEXT))
    bswa = FamConfig(mode="bswa", block_size=32, memory_blocks=2, sink_tokens=4)
    torch.testing.assert_close(logits_of(tmp_path, tokens, bswa, "bswa"),
                               logits_of("smollm2-135m", tokens, bswa, "bswa"), atol=1e-5, rtol=0)
