"""LLMEngine and AsyncEngine: continuous batching gives each request its solo tokens, seeds reproduce, finish
reasons are right, aborts and errors free the slot, prefill-only requests advance a given state."""

import asyncio

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.engine import AsyncEngine, GenerationRequest, LLMEngine
from famserve.engine.errors import ContextLengthError, InvalidRequestError, QueueFullError
from famserve.engine.sampling import SamplingParams

FAM = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir, FAM, "fam").model


def run_all(engine: LLMEngine, requests) -> dict[str, list]:
    """Submit all requests at once and step until done; returns request id -> list of outputs."""
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add(r, outputs[r.request_id].append)
    while engine.has_work():
        engine.step()
    return outputs


def tokens_of(outs):
    return [t for o in outs for t in o.token_ids]


def prompt(n, seed):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12, temperature=0),
                                    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_batched_requests_equal_solo_runs(model, params):
    lengths = [1, 5, 8, 13, 30]
    reqs = [GenerationRequest(f"r{i}", prompt(n, i), params) for i, n in enumerate(lengths)]
    together = run_all(LLMEngine(model, eos_token_ids=[], max_running=8, prefill_budget_tokens=7), reqs)
    for r in reqs:
        alone = run_all(LLMEngine(model, eos_token_ids=[]), [GenerationRequest(r.request_id, r.prompt_ids, params)])
        assert tokens_of(together[r.request_id]) == tokens_of(alone[r.request_id])
        assert together[r.request_id][-1].finish_reason == "length"
        assert len(tokens_of(together[r.request_id])) == 12


def test_stop_tokens_and_eos_end_requests(model):
    probe = run_all(LLMEngine(model, eos_token_ids=[]),
                    [GenerationRequest("p", prompt(6, 1), SamplingParams(max_tokens=6, temperature=0))])
    generated = tokens_of(probe["p"])
    third = generated[2]
    out = run_all(LLMEngine(model, eos_token_ids=[]),
                  [GenerationRequest("s", prompt(6, 1), SamplingParams(max_tokens=6, temperature=0,
                                                                       stop_token_ids=(third,)))])
    assert tokens_of(out["s"]) == generated[:generated.index(third) + 1]
    assert out["s"][-1].finish_reason == "stop"
    eos = run_all(LLMEngine(model, eos_token_ids=[third]),
                  [GenerationRequest("e", prompt(6, 1), SamplingParams(max_tokens=6, temperature=0))])
    assert eos["e"][-1].finish_reason == "stop"
    ignored = run_all(LLMEngine(model, eos_token_ids=[third]),
                      [GenerationRequest("i", prompt(6, 1), SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True))])
    assert tokens_of(ignored["i"]) == generated


def test_prefill_only_advances_a_given_state(model):
    state = model.new_state()
    out = run_all(LLMEngine(model, eos_token_ids=[]),
                  [GenerationRequest("a", prompt(19, 2), SamplingParams(), state=state, prefill_only=True)])
    assert out["a"][-1].finish_reason == "prefilled" and state.num_tokens == 19


@pytest.mark.parametrize("request_,error", [
    (GenerationRequest("x", [], SamplingParams()), InvalidRequestError),
    (GenerationRequest("x", [10**6], SamplingParams()), InvalidRequestError),
], ids=["empty-prompt", "token-outside-vocab"])
def test_bad_requests_are_refused(model, request_, error):
    with pytest.raises(error):
        LLMEngine(model, eos_token_ids=[]).add(request_, lambda o: None)


def test_full_mode_refuses_more_than_its_context(tiny_llama_dir):
    full = load_model(tiny_llama_dir, FamConfig(mode="full", block_size=8, full_context_tokens=16), "full").model
    with pytest.raises(ContextLengthError):
        LLMEngine(full, eos_token_ids=[]).add(GenerationRequest("x", prompt(10, 1), SamplingParams(max_tokens=8)),
                                              lambda o: None)


def test_queue_full_counts_free_slots_as_room(model):
    engine = LLMEngine(model, eos_token_ids=[], max_running=1, max_waiting=1)
    engine.add(GenerationRequest("a", prompt(3, 1), SamplingParams()), lambda o: None)  # takes the free slot
    engine.add(GenerationRequest("b", prompt(3, 1), SamplingParams()), lambda o: None)  # waits
    with pytest.raises(QueueFullError):
        engine.add(GenerationRequest("c", prompt(3, 1), SamplingParams()), lambda o: None)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["a"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["b"]


def test_async_engine_streams_and_abort_frees_the_slot(model):
    async def scenario():
        engine = LLMEngine(model, eos_token_ids=[], max_running=2)
        runner = AsyncEngine(engine)
        runner.start()
        try:
            seen = []
            stream = runner.generate(GenerationRequest("long", prompt(4, 1), SamplingParams(max_tokens=10**6)))
            async for out in stream:
                seen += out.token_ids
                if len(seen) >= 5:
                    break
            await stream.aclose()  # the client went away
            for _ in range(200):
                if not engine.scheduler.running and not engine.scheduler.waiting:
                    break
                await asyncio.sleep(0.01)
            assert engine.scheduler.running == [] and engine._by_id == {}
            outs = [o async for o in runner.generate(GenerationRequest("b", prompt(4, 2),
                                                                       SamplingParams(max_tokens=3)))]
            assert outs[-1].finished and outs[-1].finish_reason == "length" and len(tokens_of(outs)) == 3
            with pytest.raises(InvalidRequestError):
                [o async for o in runner.generate(GenerationRequest("c", [], SamplingParams()))]
        finally:
            runner.shutdown()
        assert not runner.is_alive

    asyncio.run(scenario())


def test_cancel_before_the_engine_accepts_aborts_the_request(model):
    async def scenario():
        engine = LLMEngine(model, eos_token_ids=[], max_running=2)
        runner = AsyncEngine(engine)
        runner.start()
        try:
            async def consume():
                request = GenerationRequest("r1", [5, 6, 7], SamplingParams(max_tokens=2000, ignore_eos=True))
                async for _ in runner.generate(request):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for _ in range(200):
                if not engine.scheduler.running and not engine._by_id:
                    break
                await asyncio.sleep(0.01)
            assert engine.scheduler.running == [] and engine._by_id == {}
        finally:
            runner.shutdown()

    asyncio.run(scenario())
