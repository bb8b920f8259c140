"""The miniature PassKey result in small (bench/passkey_miniature.py is the full run): the same 2-layer model
trained from scratch with FAM retrieves key digits far beyond the BSWA receptive field, while BSWA trained the same
way stays at chance there. Scaled down to run in well under a minute on 2 cores: L=8, M=0 (BSWA receptive field
2 x 8 = 16 tokens), training sequences of 24-40 tokens, 200 steps, fixed seed; evaluated at 64 and 128 tokens on
1,024 key digits each (chance 10%, one standard deviation 0.9 points). Measured here (about 22 s of CPU for both
runs): FAM 76% / 59%, BSWA 11% / 9%; the bounds leave wide room for another CPU's rounding to take another path."""

import pytest
import torch

from famserve.engine.training.miniature import MiniatureConfig, evaluate, train_miniature

SMALL = MiniatureConfig(steps=200, block_size=8, memory_blocks=0, min_length=24, max_length=40, lr=3e-3, seed=0)
LENGTHS = [64, 128]
FAM_AT_LEAST = {64: 0.35, 128: 0.30}


@pytest.fixture(scope="module")
def accuracy() -> dict[str, dict[int, float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for mode in ("fam", "bswa"):
            mini = train_miniature(MiniatureConfig(**{**SMALL.__dict__, "mode": mode}))
            scores = evaluate(mini, LENGTHS, samples=256, seed=1234)
            results[mode] = {n: s["digit_accuracy"] for n, s in scores.items()}
        return results
    finally:
        torch.set_num_threads(threads)


def test_lengths_are_beyond_the_bswa_receptive_field():
    assert SMALL.receptive_field == 16 and min(LENGTHS) >= 4 * SMALL.receptive_field


@pytest.mark.parametrize("length", LENGTHS)
def test_fam_retrieves_beyond_the_window_and_bswa_does_not(accuracy, length):
    fam, bswa = accuracy["fam"][length], accuracy["bswa"][length]
    assert 0.06 <= bswa <= 0.14, f"BSWA at {length} tokens: {bswa:.3f} (chance 0.10)"
    assert fam >= FAM_AT_LEAST[length], f"FAM at {length} tokens: {fam:.3f} (chance 0.10)"
