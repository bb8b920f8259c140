"""The CPU-side parts of engine/cuda_graphs.py (the graphs themselves need a GPU: tests/engine/test_cuda.py)."""

import torch

from famserve.engine.cuda_graphs import _agrees
from famserve.engine.runner import ModelRunner


def test_a_replay_agrees_with_its_eager_step_only_up_to_rounding():
    want = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    assert _agrees(want.clone(), want)
    assert _agrees(want + 1e-4 * want.abs().max(), want)  # bf16-sized differences pass
    assert not _agrees(want + 0.05 * want.abs().max(), want)  # a stale buffer or a wrong slot does not
    assert not _agrees(torch.full_like(want, float("nan")), want)
    assert not _agrees(torch.zeros_like(want), want)
    assert _agrees(torch.zeros(30, 0, 8), torch.zeros(30, 0, 8))  # a BSWA state has no FAM rows to compare


def test_graphs_are_for_cuda_only(tiny_llama_dir):
    from famserve.engine.build import load_model

    model = load_model(tiny_llama_dir, mode="bswa").model
    assert ModelRunner(model).graphs is None and ModelRunner(model, cuda_graphs=True).graphs is None
