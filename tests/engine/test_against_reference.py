"""The streaming engine equals the slow all-at-once reference (tests/engine/reference_fam.py) in every mode, for
random chunkings, with and without sinks, a trained-style FAM prompt, tied embeddings and attention biases.
The engine runs in float64 here so that any difference is a bug, not rounding: atol 1e-9."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_fam import reference_run  # noqa: E402

from famserve.engine.config import FamConfig, ModelConfig  # noqa: E402
from famserve.engine.model import FamModel  # noqa: E402
from famserve.engine.runner import ModelRunner  # noqa: E402

ATOL = 1e-9


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = FamModel(cfg, FamConfig(mode="full"))
    weights = {}
    for name, p in model.state_dict().items():
        scale = 1.0 if name.endswith("norm.weight") else 0.3
        base = 1.0 if name.endswith("norm.weight") else 0.0
        weights[name] = base + scale * torch.randn(p.shape, generator=g)
    return weights


CASES = [
    # (model overrides, fam config, tokens)
    ({}, dict(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2), 41),
    ({}, dict(mode="fam", block_size=5, memory_blocks=0, fam_length=7, sink_tokens=0), 33),
    ({}, dict(mode="fam", block_size=4, memory_blocks=2, fam_length=2, sink_tokens=4), 31),
    ({"tie_word_embeddings": True}, dict(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=1), 29),
    ({"attention_bias": True}, dict(mode="fam", block_size=6, memory_blocks=1, fam_length=3, sink_tokens=2), 27),
    ({"attention_bias": True, "attention_out_bias": True},
     dict(mode="bswa", block_size=6, memory_blocks=1, sink_tokens=2), 27),
    ({}, dict(mode="bswa", block_size=6, memory_blocks=2, sink_tokens=3), 43),
    ({}, dict(mode="bswa", block_size=5, memory_blocks=0, sink_tokens=0), 23),
    ({}, dict(mode="full", block_size=8, full_context_tokens=64), 37),
]


@pytest.mark.parametrize("overrides,fam,n_tokens", CASES,
                         ids=[f"{c[1]['mode']}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("custom_prompt", [False, True], ids=["default-prompt", "custom-prompt"])
def test_engine_equals_reference(overrides, fam, n_tokens, custom_prompt):
    cfg = ModelConfig(**{**dict(architecture="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8), **overrides})
    fam_cfg = FamConfig(**fam)
    weights = random_weights(cfg, seed=n_tokens)
    prompt = (torch.randn(fam_cfg.fam_length, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
              if custom_prompt and fam_cfg.mode == "fam" else None)
    tokens = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(2))
    ref = reference_run(weights, cfg, fam_cfg, tokens, fam_prompt=prompt)

    model = FamModel(cfg, fam_cfg)
    model.load_state_dict(weights, strict=True)
    model.to_device("cpu", torch.float64)
    model.set_fam_prompt(prompt)
    runner, state, rng, got, i = ModelRunner(model), model.new_state(), random.Random(n_tokens), [], 0
    while i < n_tokens:
        n = min(rng.randint(1, 9), n_tokens - i)
        got.append(runner.run([state], [tokens[i:i + n]], all_logits=True)[0])
        i += n
    torch.testing.assert_close(torch.cat(got), ref.logits, atol=ATOL, rtol=0)
    if fam_cfg.mode == "fam":
        torch.testing.assert_close(state.fam, torch.stack(list(ref.fam_final)).double(), atol=ATOL, rtol=0)
