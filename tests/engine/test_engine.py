"""LLMEngine and AsyncEngine: continuous batching gives each request its solo tokens, seeds reproduce, finish
reasons are right, aborts and errors free the slot, prefill-only requests advance a given state, the state byte
budget bounds the states held (the rest wait), and the stats count what ran."""

import asyncio

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import DEFAULT_CPU_STATE_MEMORY_BYTES, EngineConfig, FamConfig
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


def steps_with_more_than(engine: LLMEngine, streams: int) -> int:
    """Steps that ran more than `streams` streams (streams must be a bucket bound of the batch-size histogram)."""
    hist = engine.stats.batch_size
    return hist.count - dict(hist.cumulative())[float(streams)]


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12, temperature=0),
                                    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_batched_requests_equal_solo_runs(model, params):
    lengths = [1, 5, 8, 13, 30]
    reqs = [GenerationRequest(f"r{i}", prompt(n, i), params) for i, n in enumerate(lengths)]
    engine = LLMEngine(model, eos_token_ids=[], max_running=8, prefill_budget_tokens=7)
    together = run_all(engine, reqs)
    assert steps_with_more_than(engine, 4) > 0  # some steps decoded all five streams together
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
    (GenerationRequest("x", [1], SamplingParams(logit_bias=((10**6, 1.0),))), InvalidRequestError),
], ids=["empty-prompt", "token-outside-vocab", "logit-bias-outside-vocab"])
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


def test_streams_sharing_a_state_budget_wait_their_turn_and_get_their_solo_tokens(model):
    """Five greedy streams of different prompt lengths (different partial-block offsets) under a budget of two
    states: never more than two hold a state, the others wait in the queue, and each gets exactly its solo tokens."""
    params = SamplingParams(max_tokens=10, temperature=0)
    reqs = [GenerationRequest(f"r{i}", prompt(n, i), params) for i, n in enumerate([3, 9, 16, 1, 21])]
    engine = LLMEngine(model, eos_token_ids=[], max_running=8, prefill_budget_tokens=7,
                       state_memory_bytes=2 * model.state_nbytes + 1)
    outputs: dict[str, list] = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add(r, outputs[r.request_id].append)
    resident, waiting = [], []
    while engine.has_work():
        engine.step()
        resident.append(engine.stats.num_states_resident)
        waiting.append(engine.stats.num_waiting)
    assert max(resident) == 2 and resident[0] == 2 and waiting[0] == 3
    assert steps_with_more_than(engine, 1) > 0  # the two admitted streams ran together
    for r in reqs:
        alone = run_all(LLMEngine(model, eos_token_ids=[]), [GenerationRequest(r.request_id, r.prompt_ids, params)])
        assert tokens_of(outputs[r.request_id]) == tokens_of(alone[r.request_id])
    stats = engine.stats
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert (stats.num_states_resident, stats.states_resident_bytes) == (0, 0)
    assert stats.states_pooled_bytes == 2 * model.state_nbytes  # released states are kept, never beyond the budget
    assert stats.state_capacity_left == 2 and stats.queue_time_s.count == 5


def test_queue_room_counts_only_the_states_that_fit(model):
    engine = LLMEngine(model, eos_token_ids=[], max_running=4, max_waiting=1, state_memory_bytes=model.state_nbytes)
    engine.add(GenerationRequest("a", prompt(3, 1), SamplingParams()), lambda o: None)  # will take the one state
    engine.add(GenerationRequest("b", prompt(3, 1), SamplingParams()), lambda o: None)  # waits
    with pytest.raises(QueueFullError):
        engine.add(GenerationRequest("c", prompt(3, 1), SamplingParams()), lambda o: None)


def test_a_request_with_its_own_state_needs_no_room_in_the_budget(model):
    engine = LLMEngine(model, eos_token_ids=[], max_running=4, state_memory_bytes=model.state_nbytes)
    engine.add(GenerationRequest("a", prompt(3, 1), SamplingParams(max_tokens=50)), lambda o: None)
    engine.add(GenerationRequest("b", prompt(3, 2), SamplingParams(max_tokens=50)), lambda o: None)
    session: list = []
    engine.add(GenerationRequest("session", prompt(5, 3), SamplingParams(), state=model.new_state(),
                                 prefill_only=True), session.append)
    engine.step()  # "a" and the session run together; "b" waits for the one state of the budget
    assert session[-1].finish_reason == "prefilled"
    assert [s.request_id for s in engine.scheduler.running] == ["a"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["b"]
    assert engine.stats.num_states_resident == 1 and engine.stats.batch_size.sum == 2


@pytest.mark.parametrize("budget", [1, 0], ids=["smaller-than-a-state", "zero"])
def test_a_budget_that_holds_no_state_is_refused(model, budget):
    with pytest.raises(ValueError, match="state_memory_bytes"):
        LLMEngine(model, eos_token_ids=[], state_memory_bytes=budget * (model.state_nbytes - 1))


def test_engine_config_carries_the_limits(model):
    with pytest.raises(ValueError, match="state_memory_bytes"):
        EngineConfig(state_memory_bytes=0)
    engine = LLMEngine.from_config(model, [], EngineConfig(max_running=3, max_waiting=5, prefill_chunk_tokens=9,
                                                           state_memory_bytes=4 * model.state_nbytes))
    scheduler = engine.scheduler
    assert (scheduler.max_running, scheduler.max_waiting, scheduler.prefill_budget_tokens) == (3, 5, 9)
    assert engine.stats.state_budget_bytes == 4 * model.state_nbytes and engine.stats.state_capacity_left == 4
    default = LLMEngine(model, eos_token_ids=[])  # on CPU: the documented fixed default
    assert default.stats.state_budget_bytes == DEFAULT_CPU_STATE_MEMORY_BYTES
    # The prefill budget, unset, follows the device (larger steps on a GPU, docs/benchmarks.md run I); set, it wins.
    assert LLMEngine.from_config(model, [], EngineConfig()).scheduler.prefill_budget_tokens == 512
    assert (EngineConfig(device="cuda").prefill_tokens, EngineConfig(device="cuda:1").prefill_tokens) == (8192, 8192)
    assert EngineConfig(device="cuda", prefill_chunk_tokens=64).prefill_tokens == 64
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        EngineConfig(prefill_chunk_tokens=0)


def test_auto_device_and_dtype_resolve_to_what_this_machine_runs():
    # GPU servers load a checkpoint on the GPU in bf16 unasked; on the CPU float32 stays (AMX-less CPUs unmeasured).
    gpu = torch.cuda.is_available()
    auto = EngineConfig(device="auto", dtype="auto")
    assert (auto.device, auto.dtype) == (("cuda", "bfloat16") if gpu else ("cpu", "float32"))
    assert EngineConfig(device="cpu", dtype="auto").dtype == "float32"
    assert EngineConfig(device="auto", dtype="float16").dtype == "float16"  # a named dtype is kept
    assert EngineConfig(device="cuda:1", dtype="auto").dtype in ("bfloat16", "float16")
    assert EngineConfig(device="auto").prefill_tokens == (8192 if gpu else 512)  # the resolved device's default
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")


def test_stats_count_tokens_fam_updates_steps_and_queue_time(model):
    engine = LLMEngine(model, eos_token_ids=[])
    out = run_all(engine, [GenerationRequest("a", prompt(13, 4), SamplingParams(max_tokens=6, temperature=0))])
    assert len(tokens_of(out["a"])) == 6
    stats = engine.stats
    assert stats.prefill_tokens_total == 13 and stats.decode_tokens_total == 6
    assert stats.fam_updates_total == (13 + 6 - 1) // FAM.block_size  # the last token is sampled, never fed
    assert stats.steps_total == stats.batch_size.count == 6  # one prefill step (13 <= 512), five decode steps
    assert stats.batch_size.sum == 6 and stats.preemptions_total == 0
    assert stats.queue_time_s.count == 1 and 0 <= stats.queue_time_s.sum < 5


def test_gauges_are_current_when_outputs_go_out(model):
    """A client that has its first token sees its slot taken, and one that has its last output sees it free: the
    gauges are refreshed before those outputs are emitted, not only after the step."""
    engine = LLMEngine(model, eos_token_ids=[], max_running=4)
    seen: list[tuple[bool, int, int]] = []  # (finished, num_running, num_states_resident) at each emit

    def emit(out) -> None:
        seen.append((out.finished, engine.stats.num_running, engine.stats.num_states_resident))

    engine.add(GenerationRequest("g", prompt(5, 0), SamplingParams(max_tokens=3, temperature=0)), emit)
    while engine.has_work():
        engine.step()
    assert seen == [(False, 1, 1)] * 3 + [(True, 0, 0)]
