"""BlockScheduler alone (pure Python, no model): admission by free slots and by the state byte budget in arrival
order, queue room, and the prefill policy that lets short chats through while a long ingest keeps moving."""

from __future__ import annotations

import pytest

from famserve.engine.scheduler import BlockScheduler, Sequence, Status

STATE = 100  # bytes of one stream's state in these tests


def seq(name: str, num_prompt: int = 4, max_new: int = 8, state_nbytes: int = STATE) -> Sequence:
    return Sequence(name, list(range(num_prompt)), max_new, state_nbytes=state_nbytes)


def names(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def consume(scheduler: BlockScheduler, work) -> None:
    """What the engine does after a step: prompts advance, finished prefills turn to decoding."""
    for s, n in work.items:
        if s.status is Status.PREFILL:
            s.num_prefilled += n
            if not s.num_prompt_left:
                s.status = Status.DECODE


@pytest.mark.parametrize(("max_running", "budget", "admitted"), [
    (8, None, ["a", "b", "c", "d"]),
    (2, None, ["a", "b"]),
    (8, 3 * STATE, ["a", "b", "c"]),
    (8, 3 * STATE - 1, ["a", "b"]),
    (1, 3 * STATE, ["a"]),
], ids=["all-fit", "slots", "budget", "budget-just-short", "slots-before-budget"])
def test_admission_is_bounded_by_slots_and_state_budget(max_running, budget, admitted):
    scheduler = BlockScheduler(max_running, max_waiting=8, prefill_budget_tokens=64, state_budget_bytes=budget)
    for name in "abcd":
        scheduler.add(seq(name))
    work = scheduler.schedule()
    assert names(work.admitted) == admitted
    assert names(scheduler.running) == admitted
    assert names(scheduler.waiting) == [n for n in "abcd" if n not in admitted]
    assert scheduler.state_bytes_in_use == len(admitted) * STATE


def test_a_finished_stream_lets_the_next_one_in_arrival_order():
    scheduler = BlockScheduler(8, max_waiting=8, prefill_budget_tokens=64, state_budget_bytes=2 * STATE)
    queued = [seq(n) for n in "abcd"]
    for s in queued:
        scheduler.add(s)
    scheduler.schedule()
    scheduler.finish(queued[1], "length")
    assert scheduler.state_bytes_in_use == STATE
    assert names(scheduler.schedule().admitted) == ["c"]
    scheduler.finish(queued[3], "abort")  # a waiting request leaves the queue, takes nothing
    assert names(scheduler.waiting) == [] and scheduler.state_bytes_in_use == 2 * STATE


def test_a_request_with_its_own_state_passes_one_waiting_for_the_budget():
    scheduler = BlockScheduler(8, max_waiting=8, prefill_budget_tokens=64, state_budget_bytes=STATE)
    for s in (seq("fresh-1"), seq("fresh-2"), seq("session", state_nbytes=0), seq("fresh-3")):
        scheduler.add(s)
    assert names(scheduler.schedule().admitted) == ["fresh-1", "session"]
    assert names(scheduler.waiting) == ["fresh-2", "fresh-3"]


@pytest.mark.parametrize(("max_running", "budget", "max_waiting", "room_for"), [
    (4, None, 2, 6),  # four free slots and two queue places
    (4, 2 * STATE, 2, 4),  # the budget holds two states: two run at once, two wait
    (1, 8 * STATE, 3, 4),
])
def test_queue_room_counts_the_streams_that_could_start(max_running, budget, max_waiting, room_for):
    scheduler = BlockScheduler(max_running, max_waiting, prefill_budget_tokens=64, state_budget_bytes=budget)
    accepted = 0
    while scheduler.has_room(STATE):
        scheduler.add(seq(f"r{accepted}"))
        accepted += 1
    assert accepted == room_for


def test_short_chats_overtake_a_long_ingest_which_still_advances():
    budget = 64
    scheduler = BlockScheduler(8, max_waiting=8, prefill_budget_tokens=budget)
    ingest = seq("ingest", num_prompt=10_000, max_new=0)
    scheduler.add(ingest)
    consume(scheduler, scheduler.schedule())  # the ingest alone takes the whole budget
    assert ingest.num_prefilled == budget
    chats = [seq(f"chat{i}", num_prompt=n) for i, n in enumerate((20, 9, 30))]
    for chat in chats:
        scheduler.add(chat)
    work = scheduler.schedule()
    grants = {s.request_id: n for s, n in work.items}
    assert grants["ingest"] >= budget // 4  # the oldest prefilling stream keeps a quarter of the budget
    assert grants["chat1"] == 9 and grants["chat0"] == 20  # shortest first, whole prompts
    assert sum(grants.values()) == budget
    consume(scheduler, work)
    for _ in range(3):  # every chat reaches decoding within a few steps; the ingest never stops
        before = ingest.num_prefilled
        work = scheduler.schedule()
        consume(scheduler, work)
        assert ingest.num_prefilled - before >= budget // 4
    assert all(chat.status is Status.DECODE for chat in chats)
    decoding = [s for s, n in scheduler.schedule().items if s.status is Status.DECODE]
    assert sorted(names(decoding)) == ["chat0", "chat1", "chat2"]  # one token each per step, every step
