"""The engine on a CUDA device (marked `gpu`, skipped without one): the same exactness as on the CPU in float32 (HF
parity, chunking invariance, CPU == CUDA, states that move between devices), and the batched bf16 decode path the
server runs on a GPU. Tolerances are looser than the CPU tests' because GPU kernels reduce in other orders."""

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import EngineConfig, FamConfig
from famserve.engine.engine import GenerationRequest, LLMEngine
from famserve.engine.runner import ModelRunner
from famserve.engine.sampling import SamplingParams
from famserve.engine.state import FamState
from famserve.engine.training.sequence import sequence_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ATOL = 1e-4  # fp32 on CUDA (TF32 off, torch's default for matmuls)
FAM = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)
BSWA = FamConfig(mode="bswa", block_size=8, memory_blocks=2, sink_tokens=4)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream_logits(model, ids: list[int], chunk: int) -> torch.Tensor:
    runner, state, out = ModelRunner(model), model.new_state(), []
    for i in range(0, len(ids), chunk):
        out.append(runner.run([state], [ids[i:i + chunk]], all_logits=True)[0])
    return torch.cat(out).float().cpu()


@pytest.fixture(scope="module", params=[FAM, BSWA], ids=["fam", "bswa"])
def fam(request) -> FamConfig:
    return request.param


def test_full_mode_on_cuda_matches_hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tokens(77, 1)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    full = FamConfig(mode="full", block_size=16, full_context_tokens=128)
    model = load_model(tiny_llama_dir, full, "full", EngineConfig(device="cuda")).model
    torch.testing.assert_close(stream_logits(model, ids, 13), expected, atol=ATOL, rtol=0)


def test_cuda_equals_cpu_and_chunking_is_invariant(tiny_llama_dir, fam):
    ids = tokens(5 * 8 + 3, 2)
    cpu = stream_logits(load_model(tiny_llama_dir, fam, fam.mode).model, ids, 10**9)
    cuda_model = load_model(tiny_llama_dir, fam, fam.mode, EngineConfig(device="cuda")).model
    for chunk in (1, 5, 10**9):
        torch.testing.assert_close(stream_logits(cuda_model, ids, chunk), cpu, atol=ATOL, rtol=0)


def test_state_moves_between_devices(tiny_llama_dir, tmp_path):
    cpu_model = load_model(tiny_llama_dir, FAM, "fam").model
    cuda_model = load_model(tiny_llama_dir, FAM, "fam", EngineConfig(device="cuda")).model
    state = cuda_model.new_state()
    ModelRunner(cuda_model).prefill(state, [tokens(29, 3)])
    path = tmp_path / "state.safetensors"
    state.save(path, "tiny", cuda_model.config, cuda_model.fam_config)
    on_cpu = FamState.load(path, cpu_model.config, cpu_model.fam_config)
    on_cuda = FamState.load(path, cuda_model.config, cuda_model.fam_config, device="cuda")
    next_ids = tokens(11, 4)
    want = ModelRunner(cpu_model).run([on_cpu], [next_ids], all_logits=True)[0]
    got = ModelRunner(cuda_model).run([on_cuda], [next_ids], all_logits=True)[0].cpu()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_training_forward_on_cuda_equals_the_engine(tiny_llama_dir):
    model = load_model(tiny_llama_dir, FAM, "fam", EngineConfig(device="cuda")).model
    ids = tokens(45, 5)
    want = stream_logits(model, ids, 7)
    got = sequence_logits(model, FAM, torch.tensor([ids], device="cuda"))[0].float().cpu()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_command_runs_on_cuda(tiny_llama_dir, tmp_path, precision):
    from famserve.engine.training.trainer import TrainConfig, train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. Hello world!\n" * 40)
    cfg = TrainConfig(model=str(tiny_llama_dir), out=str(tmp_path / "a.safetensors"), data=(str(corpus),),
                      passkey=True, steps=3, seq_len=200, batch_size=2, lora_rank=2, fam_length=4, block_size=16,
                      memory_blocks=1, sink_tokens=2, device="cuda", precision=precision)
    result = train(cfg, progress=False)
    assert result.steps == 3 and result.last_loss == result.last_loss  # finite, not NaN
    loaded = load_model(tiny_llama_dir, FamConfig(block_size=16, memory_blocks=1, sink_tokens=2),
                        engine=EngineConfig(device="cuda"), adapter_path=result.adapter_path)
    assert loaded.model.fam_config.mode == "fam" and loaded.model.device.type == "cuda"


@pytest.mark.parametrize("inference_mode", [False, True], ids=["no_grad", "inference_mode"])
def test_decode_graphs_replay_the_eager_step(tiny_llama_dir, fam, inference_mode):
    """Decode steps through CUDA graphs (ModelRunner's default on CUDA) == eager steps, token by token, over block
    boundaries and the sinks: lone streams taking turns, a batch of three, more batches than the graph cache holds
    (evicted, captured again), and a fork; the graphs were really captured and replayed (a silent fall back to
    eager steps fails)."""
    model = load_model(tiny_llama_dir, fam, fam.mode, EngineConfig(device="cuda")).model
    eager, graphed = ModelRunner(model, cuda_graphs=False), ModelRunner(model)
    graphed.graphs.decode_capacity = 2
    mine, theirs = [model.new_state() for _ in range(3)], [model.new_state() for _ in range(3)]

    def decode(batch: list[int], steps) -> None:  # steps: one token per stream of the batch, per step
        for n, step_tokens in enumerate(steps):
            ids = [[t] for t in step_tokens]
            want = torch.cat(eager.run([theirs[i] for i in batch], ids)).cpu()
            got = torch.cat(graphed.run([mine[i] for i in batch], ids)).cpu()
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"streams {batch}, step {n}")

    with torch.inference_mode(inference_mode):
        for a, b in zip(tokens(30, 20), tokens(30, 21)):  # streams 0 and 1 alone, taking turns: replays
            decode([0], [[a]])
            decode([1], [[b]])
        decode([0, 1, 2], zip(tokens(20, 22), tokens(20, 23), tokens(20, 24)))  # a batch: evicts stream 0's graph
        decode([0], [[t] for t in tokens(5, 25)])  # captured again
        mine.append(mine[0].clone())
        theirs.append(theirs[0].clone())
        decode([3], [[t] for t in tokens(9, 26)])  # a fork: its own buffers, its own graph
    for name, t in theirs[3].tensors().items():
        torch.testing.assert_close(mine[3].tensors()[name].cpu(), t.cpu(), atol=ATOL, rtol=0, msg=name)
    graphs = graphed.graphs
    assert not graphs.broken and graphs.captures == 5 and graphs.replays >= 45  # each batch: eager once, then captured


def test_block_graphs_replay_the_eager_blocks(tiny_llama_dir, fam):
    """Prefill block by block through CUDA graphs (FamModel.fill_block, the FAM update riding along) == eager steps,
    in the last logits and every state tensor: a long prompt, a second stream (its own graph), the first stream
    going on (its graph replayed again), decode after it; each capture was checked against its eager step."""
    model = load_model(tiny_llama_dir, fam, fam.mode, EngineConfig(device="cuda")).model
    eager = ModelRunner(model, max_step_tokens=64, whole_blocks=False, cuda_graphs=False)
    graphed = ModelRunner(model, max_step_tokens=64, whole_blocks=False)  # BSWA: one block a step, not 8 a pass
    mine, theirs = [model.new_state(), model.new_state()], [model.new_state(), model.new_state()]

    def feed(i: int, ids: list[int]) -> None:
        want = eager.run([theirs[i]], [ids])[0].cpu()
        got = graphed.run([mine[i]], [ids])[0].cpu()
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"stream {i}")
        for name, t in theirs[i].tensors().items():
            torch.testing.assert_close(mine[i].tensors()[name].cpu(), t.cpu(), atol=ATOL, rtol=0, msg=name)
        assert (mine[i].num_tokens, mine[i].num_fam_updates) == (theirs[i].num_tokens, theirs[i].num_fam_updates)

    feed(0, tokens(12 * 8 + 5, 30))  # ends inside a block: its last 5 tokens are an eager step
    feed(1, tokens(6 * 8, 31))
    feed(0, tokens(3, 32) + tokens(4 * 8, 33))  # completes the block, then 4 whole ones from stream 0's graph
    for token in tokens(10, 34):
        feed(0, [token])
    graphs = graphed.graphs
    assert not graphs.broken and graphs.captures >= 3 and graphs.replays >= 15


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_engine_decode_on_cuda(tiny_llama_dir, fam, dtype):
    """Streams of different lengths decoded in one batch: fp32 gives each stream exactly its solo tokens; bf16 (other
    kernels per batch size, so argmax near-ties may flip) gives logits close to fp32's and finishes every request."""
    model = load_model(tiny_llama_dir, fam, fam.mode, EngineConfig(device="cuda", dtype=dtype)).model
    params = SamplingParams(max_tokens=12, temperature=0)
    requests = [GenerationRequest(f"r{i}", tokens(n, 10 + i), params) for i, n in enumerate([1, 5, 8, 13, 30, 64])]

    last_engine = []

    def run(reqs) -> dict[str, list[int]]:
        engine = LLMEngine(model, eos_token_ids=[], max_running=8, prefill_budget_tokens=16)
        last_engine[:] = [engine]
        out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        for r in reqs:
            engine.add(r, lambda o, rid=r.request_id: out[rid].extend(o.token_ids))
        while engine.has_work():
            engine.step()
        return out

    together = run(requests)
    assert all(len(v) == 12 for v in together.values())
    engine = last_engine[0]  # decode steps came from CUDA graphs, and the engine's metrics say how many
    graphs = engine.runner.graphs
    assert graphs.captures >= 1 and not graphs.broken
    assert (engine.stats.cuda_graph_captures_total, engine.stats.cuda_graph_replays_total) == (graphs.captures,
                                                                                             graphs.replays)
    if dtype == "float32":
        for r in requests:
            assert together[r.request_id] == run([GenerationRequest(r.request_id, r.prompt_ids, params)])[r.request_id]
    else:
        ref = load_model(tiny_llama_dir, fam, fam.mode, EngineConfig(device="cuda")).model
        ids = tokens(40, 6)
        want, got = stream_logits(ref, ids, 16), stream_logits(model, ids, 16)
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
