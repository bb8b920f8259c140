"""Tests of engine/sampling.py: parameter validation, the logit processors against their formulas, greedy and
filtered sampling, per-request seeds independent of the batch, the sampled distribution, and logprobs."""

import math

import pytest
import torch

from famserve.engine.sampling import (
    SampleOutput,
    Sampler,
    SamplingParams,
    SamplingState,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    filter_logits,
)

V = 32  # vocab size of the synthetic logits
INF = math.inf


def random_logits(batch: int, seed: int, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def states_for(params: list[SamplingParams], prompt_ids=(), vocab: int = V) -> list[SamplingState]:
    return [SamplingState(p, vocab, prompt_ids) for p in params]


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> SampleOutput:
    return Sampler(logits.shape[1]).sample(logits, states_for(params, vocab=logits.shape[1]))


def log_probs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


# --- SamplingParams ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.0),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -2.01),
    ("seed", 1.5),
    ("stop_token_ids", (1, -1)),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logit_bias", ((-1, 1.0),)),
    ("logit_bias", ((3, 100.5),)),
    ("logit_bias", ((3, -101),)),
    ("logit_bias", ((3, "up"),)),
])
def test_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs", [
    {},
    {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0},
    {"temperature": 5.0, "top_p": 1e-9, "top_k": 1, "min_p": 1.0},
    {"repetition_penalty": 1e-3, "presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"seed": -7, "stop_token_ids": (0, 2), "ignore_eos": True, "logprobs": 0},
    {"seed": 2**64 - 1, "logprobs": 20},
    {"logit_bias": [(0, -100), (5, 100.0), (7, 0.5)]},
])
def test_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature, is_greedy", [(0.0, True), (1e-6, True), (1e-5, False), (1.0, False)])
def test_is_greedy(temperature, is_greedy):
    assert SamplingParams(temperature=temperature).is_greedy is is_greedy


def test_stop_token_ids_list_becomes_tuple():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


# --- logit processors -------------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0], [3.0, 3.0, -1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True], [True, False, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 0.5]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0], [6.0, 3.0, -0.5, -1.0, 0.0]]


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([[0, 1, 3, 0], [2, 0, 0, 1]], dtype=torch.int32)
    out = apply_presence_frequency_penalty(logits, counts, torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.0]))
    # logit - presence * (count > 0) - frequency * count
    assert out.tolist() == [[1.0, 0.25, -0.25, 1.0], [-1.0, 0.0, 0.0, 0.0]]


def test_state_counts_generated_tokens_and_marks_prompt_and_generated_as_seen():
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5)
    state = SamplingState(params, 6, prompt_ids=[1, 1, 4])
    for token in (2, 2, 4):
        state.observe(token)
    assert state.output_counts.tolist() == [0, 0, 2, 0, 1, 0]
    assert state.seen.tolist() == [False, True, True, False, True, False]


def test_state_allocates_only_what_its_penalties_need():
    state = SamplingState(SamplingParams(), V, prompt_ids=[1, 2])
    state.observe(3)
    assert (state.output_counts, state.seen) == (None, None)


def test_state_rejects_prompt_ids_outside_vocab():
    with pytest.raises(ValueError, match="^prompt_ids: "):
        SamplingState(SamplingParams(repetition_penalty=1.1), 6, prompt_ids=[0, 6])


def test_logit_bias_bans_and_forces_tokens_for_greedy_and_sampled_rows():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0, logit_bias=((0, -100.0),)),  # the argmax banned: the runner-up
              SamplingParams(temperature=0, logit_bias=((0, -0.5), (2, 1.5))),  # 3.5, 3.0, 3.5: ties to the lowest
              SamplingParams(seed=4, logit_bias=((3, 100.0),))]  # e^100 against e^0: always token 3
    sampler = Sampler(4)
    for _ in range(20):
        states = [SamplingState(p, 4) for p in params]
        assert sampler.sample(logits, states).token_ids == [1, 0, 3]
    state = SamplingState(params[0], 4)
    assert state.logit_bias.tolist() == [-100.0, 0.0, 0.0, 0.0]  # dense, zero where the request names no token
    assert SamplingState(SamplingParams(), 4).logit_bias is None


def test_logit_bias_comes_before_penalties_and_leaves_logprobs_raw():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    # token 0 seen: (2.0 + 2.0) / 2 = 2.0 against 1.9 (bias first) -- penalty first would give 1.0 + 2.0 = 3.0
    params = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias=((0, 2.0), (1, 0.2)), logprobs=1)
    out = Sampler(3).sample(logits, [SamplingState(params, 3, prompt_ids=[0])])
    assert out.token_ids == [1]  # 1.9 + 0.2 = 2.1 beats 2.0
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.log_softmax(logits, -1)[0, [1]], atol=1e-6, rtol=0)


def test_state_rejects_a_logit_bias_outside_vocab():
    with pytest.raises(ValueError, match=r"^logit_bias: token id 6 is outside the vocabulary \(0..5\)"):
        SamplingState(SamplingParams(logit_bias=((2, 1.0), (6, 1.0))), 6)


def test_sampler_applies_penalties_before_greedy_argmax():
    logits = torch.tensor([[4.0, 3.0, 2.9, -1.0]])
    original = logits.clone()
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1)
    state = SamplingState(params, 4, prompt_ids=[0])  # token 0: 4.0 / 2 = 2.0
    sampler = Sampler(4)
    assert sampler.sample(logits, [state]).token_ids == [1]
    state.observe(1)  # token 1: 3.0 / 2 - 0.5 - 0.1 = 0.9 -> token 2 (2.9) wins
    assert sampler.sample(logits, [state]).token_ids == [2]
    assert torch.equal(logits, original)  # the caller's logits are not modified


@pytest.mark.parametrize("kwargs, kept", [
    ({}, [0, 1, 2, 3]),
    ({"top_k": 0}, [0, 1, 2, 3]),
    ({"top_k": -1}, [0, 1, 2, 3]),
    ({"top_k": 1}, [0]),
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_k": 99}, [0, 1, 2, 3]),
    ({"top_p": 1e-6}, [0]),
    ({"top_p": 0.4}, [0]),
    ({"top_p": 0.75}, [0, 1]),
    ({"top_p": 0.85}, [0, 1, 2]),
    ({"top_p": 0.99}, [0, 1, 2, 3]),
    ({"min_p": 0.2}, [0, 1, 2]),  # 0.05 < 0.2 * 0.5
    ({"min_p": 0.7}, [0]),  # 0.3 < 0.35
    ({"top_k": 3, "top_p": 0.82}, [0, 1]),  # top-p over the renormalised top 3: (0.5 + 0.3) / 0.95 >= 0.82
    ({"top_k": 2, "min_p": 0.7}, [0]),
])
def test_filter_keeps_expected_tokens(kwargs, kept):
    logits = torch.tensor([log_probs(0.5, 0.3, 0.15, 0.05)])
    params = SamplingParams(**kwargs)
    args = {"temperature": torch.tensor([1.0])}
    if "top_k" in kwargs:
        args["top_k"] = torch.tensor([params.top_k])
    if "top_p" in kwargs:
        args["top_p"] = torch.tensor([params.top_p])
    if "min_p" in kwargs:
        args["min_p"] = torch.tensor([params.min_p])
    out = filter_logits(logits, **args)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept
    assert out[0, kept].tolist() == logits[0, kept].tolist()


def test_filter_divides_by_temperature_before_min_p():
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    # min_p 0.3: at T=1 p1/p0 = e^-1 = 0.37 survives; at T=0.5 it is e^-2 = 0.14 and is removed
    out = filter_logits(logits, torch.tensor([1.0, 0.5]), min_p=torch.tensor([0.3, 0.3]))
    assert out.tolist() == [[2.0, 1.0, -INF], [4.0, -INF, -INF]]


def test_filter_rows_use_their_own_parameters():
    logits = random_logits(4, seed=0)
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.5])
    top_k = torch.tensor([0, 5, 1, 12])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.3])
    min_p = torch.tensor([0.0, 0.1, 0.0, 0.05])
    batched = filter_logits(logits, temperature, top_k, top_p, min_p)
    for i in range(4):
        alone = filter_logits(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], min_p[i:i + 1])
        assert batched[i].tolist() == alone[0].tolist()


# --- greedy and degenerate filters ------------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [
    ([0.0, 1.0, 5.0, 2.0], 2),
    ([1.0, 3.0, 3.0, 0.0], 1),  # tie -> lowest id
    ([-INF, -2.0, -3.0, -INF], 1),
    ([7.0, 7.0, 7.0, 7.0], 0),
])
def test_greedy_is_argmax_with_ties_to_lowest_id(row, expected):
    assert sample(torch.tensor([row]), [SamplingParams(temperature=0)]).token_ids == [expected]


def test_greedy_ignores_seed_and_leaves_generator_untouched():
    logits = random_logits(3, seed=1)
    params = [SamplingParams(temperature=0, seed=s) for s in (0, 1, None)]
    states = states_for(params)
    before = [s.generator.get_state() for s in states]
    out = Sampler(V).sample(logits, states)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert all(torch.equal(b, s.generator.get_state()) for b, s in zip(before, states))


@pytest.mark.parametrize("kwargs", [
    {"top_k": 1},
    {"top_p": 1e-6},
    {"min_p": 1.0},
    {"temperature": 2.0, "top_k": 1},
])
def test_degenerate_filters_equal_greedy(kwargs):
    logits = random_logits(8, seed=2)
    params = [SamplingParams(seed=s, **kwargs) for s in range(8)]
    sampler, states = Sampler(V), states_for(params)
    for _ in range(5):
        assert sampler.sample(logits, states).token_ids == logits.argmax(dim=-1).tolist()


def test_padding_columns_past_vocab_are_never_sampled():
    logits = torch.cat([random_logits(2, seed=3), torch.full((2, 8), 100.0)], dim=1)  # (2, V + 8)
    states = states_for([SamplingParams(temperature=0), SamplingParams(seed=1)])
    tokens = Sampler(V).sample(logits, states).token_ids
    assert tokens[0] == logits[0, :V].argmax().item()
    assert tokens[1] < V


def test_bfloat16_logits_are_upcast():
    logits = random_logits(2, seed=4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0), SamplingParams(seed=5)]
    assert sample(logits, params).token_ids == sample(logits.float(), params).token_ids


# --- seeds ------------------------------------------------------------------------------------------------------

def draw_sequence(params: list[SamplingParams], row: int, steps: int = 50) -> list[int]:
    """`steps` tokens of row `row`, each step on fresh logits, every row observing its token."""
    sampler, states = Sampler(V), states_for(params, prompt_ids=[0, 1, 2])
    tokens = []
    for step in range(steps):
        logits = random_logits(len(params), seed=100 + step)
        logits[row] = random_logits(1, seed=1000 + step)[0]  # the tracked row sees the same logits in any batch
        out = sampler.sample(logits, states)
        for state, token in zip(states, out.token_ids):
            state.observe(token)
        tokens.append(out.token_ids[row])
    return tokens


SEEDED = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
OTHERS = [
    SamplingParams(temperature=0),
    SamplingParams(seed=7, top_k=5, repetition_penalty=1.3, frequency_penalty=0.5),
    SamplingParams(temperature=1.5, min_p=0.05, presence_penalty=1.0),  # unseeded
]


@pytest.mark.parametrize("row", [0, 2, 3])
def test_same_seed_same_tokens_alone_or_in_a_batch(row):
    batch = OTHERS[:row] + [SEEDED] + OTHERS[row:]
    assert draw_sequence(batch, row) == draw_sequence([SEEDED], 0)


def test_different_seeds_give_different_tokens():
    first = draw_sequence([SamplingParams(seed=1)], 0)
    assert first == draw_sequence([SamplingParams(seed=1)], 0)
    assert first != draw_sequence([SamplingParams(seed=2)], 0)


def test_unseeded_requests_differ():
    assert draw_sequence([SamplingParams()], 0) != draw_sequence([SamplingParams()], 0)


# --- distribution -----------------------------------------------------------------------------------------------

PROBS = [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("kwargs, expected", [
    ({}, PROBS),
    ({"temperature": 2.0}, [p ** 0.5 / sum(q ** 0.5 for q in PROBS) for p in PROBS]),
    ({"top_k": 2}, [0.0, 0.0, 3 / 7, 4 / 7]),
    ({"top_p": 0.6}, [0.0, 0.0, 3 / 7, 4 / 7]),
    ({"min_p": 0.6}, [0.0, 0.0, 3 / 7, 4 / 7]),
])
def test_sampled_frequencies_match_distribution(kwargs, expected):
    """1,000 seeded requests x 20 steps = 20,000 draws; tolerance 0.02 absolute (about 5 standard deviations)."""
    num_requests, num_steps = 1_000, 20
    logits = torch.tensor([log_probs(*PROBS)]).expand(num_requests, -1)
    sampler = Sampler(4)
    states = states_for([SamplingParams(seed=i, **kwargs) for i in range(num_requests)], vocab=4)
    tokens = torch.tensor([sampler.sample(logits, states).token_ids for _ in range(num_steps)])  # (steps, requests)
    freqs = torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()
    torch.testing.assert_close(freqs, torch.tensor(expected, dtype=torch.float64), atol=0.02, rtol=0)


# --- logprobs ---------------------------------------------------------------------------------------------------

def test_logprobs_are_log_softmax_of_raw_logits():
    logits = random_logits(4, seed=6)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(seed=1, logprobs=None),
        SamplingParams(seed=2, temperature=0.5, top_k=4, repetition_penalty=2.0, logprobs=5),
        SamplingParams(seed=3, logprobs=0),
    ]
    out = sample(logits, params)
    expected = torch.log_softmax(logits, dim=-1)
    assert len(out.logprobs) == 4
    chosen = expected.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=1e-6, rtol=0)
    assert [len(top) for top in out.top_logprobs] == [3, 0, 5, 0]
    for i, top in enumerate(out.top_logprobs):
        if top:
            values, ids = expected[i].topk(len(top))
            assert [t for t, _ in top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([lp for _, lp in top]), values, atol=1e-6, rtol=0)


def test_no_logprobs_when_no_row_asks():
    out = sample(random_logits(2, seed=7), [SamplingParams(seed=1), SamplingParams(temperature=0)])
    assert (out.logprobs, out.top_logprobs) == (None, None)


# --- misuse -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, vocab, match", [
    ((2, V), V, "^logits: expected shape"),  # one state for two rows
    ((1, V - 1), V, "^logits: has 31 columns"),
    ((1, V), V - 1, "^states: a state built for vocab_size=32 on cpu"),
])
def test_sampler_rejects_mismatched_inputs(shape, vocab, match):
    with pytest.raises(ValueError, match=match):
        Sampler(vocab).sample(torch.zeros(shape), states_for([SamplingParams()]))


# --- CUDA -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_seeded_row_is_batch_invariant(dtype):
    vocab = 50_000
    seeded = SamplingParams(seed=99, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1)
    others = [SamplingParams(temperature=0), SamplingParams(seed=3, min_p=0.1), SamplingParams(top_p=0.5)]
    logits = torch.randn(4, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
    runs = []
    for batch, row in (([seeded], 0), (others[:2] + [seeded] + others[2:], 2)):
        sampler = Sampler(vocab)
        states = [SamplingState(p, vocab, [5, 6], device="cuda") for p in batch]
        tokens = []
        for step in range(20):
            x = logits.roll(step, dims=1)[:len(batch)].clone()
            x[row] = logits[0].roll(step)
            out = sampler.sample(x, states)
            for state, token in zip(states, out.token_ids):
                state.observe(token)
            tokens.append(out.token_ids[row])
        runs.append(tokens)
    assert runs[0] == runs[1]
