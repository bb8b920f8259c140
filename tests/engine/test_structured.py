"""Structured output (engine/structured.py) through the real engine and the tiny random model: whatever the weights
say, greedy or sampled, the output parses as the JSON schema, matches the regex, is one of the choices or is a
sentence of the grammar, and the request stops when the format is complete. A format that does not compile is
refused when the request is added, naming its field; rows without a format are untouched in a mixed batch."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.engine import AsyncEngine, GenerationRequest, LLMEngine
from famserve.engine.errors import InvalidRequestError
from famserve.engine.sampling import SamplingParams
from famserve.engine.structured import GrammarCompiler, OutputFormat, json_schema_format

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "ok", "n"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir, FamConfig(block_size=32, memory_blocks=1, sink_tokens=2), mode="bswa")


@pytest.fixture(scope="module")
def grammar(loaded) -> GrammarCompiler:
    return GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size)


def generate(loaded, grammar, requests: list[tuple[str, SamplingParams]]) -> dict[str, tuple[str, str]]:
    """request id -> (text, finish reason), all requests run together."""
    engine = LLMEngine(loaded.model, loaded.tokenizer.eos_token_ids, grammar=grammar)
    tokens: dict[str, list[int]] = {rid: [] for rid, _ in requests}
    reasons: dict[str, str] = {}

    def emit(out):
        tokens[out.request_id] += out.token_ids
        if out.finished:
            reasons[out.request_id] = out.finish_reason

    prompt = loaded.tokenizer.encode("The answer, as JSON:")
    for rid, params in requests:
        engine.add(GenerationRequest(rid, prompt, params), emit)
    while engine.has_work():
        engine.step()
    return {rid: (loaded.tokenizer.decode(ids, skip_special_tokens=True), reasons[rid]) for rid, ids in tokens.items()}


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=1.5,
                                                                                               seed=2)])
def test_json_schema_output_always_validates(loaded, grammar, sampling):
    fmt = json_schema_format(SCHEMA)
    [(text, reason)] = generate(loaded, grammar, [("a", SamplingParams(max_tokens=60, output_format=fmt,
                                                                       **sampling))]).values()
    assert reason == "stop"  # the object closed well within max_tokens, and generation stopped there
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == json.dumps(json.loads(text))  # the spacing of json.dumps: no free whitespace


def test_any_json_object_regex_and_choice(loaded, grammar):
    regex = r"[A-Z][a-z]{2,5}-[0-9]{3}"
    choices = ["yes", "no", "not sure"]
    out = generate(loaded, grammar, [
        ("object", SamplingParams(max_tokens=40, seed=3, output_format=json_schema_format({"type": "object"}))),
        ("regex", SamplingParams(max_tokens=20, seed=4, output_format=OutputFormat("regex", regex))),
        ("choice", SamplingParams(max_tokens=20, seed=5, output_format=OutputFormat("choice", json.dumps(choices)))),
    ])
    assert out["object"][1] == "stop" and isinstance(json.loads(out["object"][0]), dict)
    assert out["regex"][1] == "stop" and re.fullmatch(regex, out["regex"][0])
    assert out["choice"][1] == "stop" and out["choice"][0] in choices


def test_lark_and_gbnf_grammars(loaded, grammar):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'
    gbnf = 'root ::= "say " ("hi" | "bye") "!"'
    out = generate(loaded, grammar, [
        ("lark", SamplingParams(max_tokens=30, temperature=0, output_format=OutputFormat("grammar", lark))),
        ("gbnf", SamplingParams(max_tokens=30, seed=6, output_format=OutputFormat("grammar", gbnf))),
    ])
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)", out["lark"][0]) and out["lark"][1] == "stop"
    assert out["gbnf"] == ("say hi!", "stop") or out["gbnf"] == ("say bye!", "stop")


def test_max_tokens_cuts_a_format_short(loaded, grammar):
    fmt = OutputFormat("regex", "a{50}")
    [(text, reason)] = generate(loaded, grammar, [("a", SamplingParams(max_tokens=5, output_format=fmt))]).values()
    assert reason == "length" and set(text) == {"a"} and len(text) >= 5


def test_rows_without_a_format_get_their_solo_tokens(loaded, grammar):
    plain = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    solo = generate(loaded, grammar, [("plain", plain)])["plain"]
    mixed = generate(loaded, grammar, [("json", SamplingParams(max_tokens=40, output_format=json_schema_format(
        SCHEMA))), ("plain", plain)])
    assert mixed["plain"] == solo
    jsonschema.validate(json.loads(mixed["json"][0]), SCHEMA)


@pytest.mark.parametrize("fmt, message", [
    (OutputFormat("json", "{not json"), r"^response_format: "),
    (OutputFormat("json", '{"type": "nonsense"}', "response_format.json_schema"),
     r"^response_format.json_schema: .*nonsense"),
    (OutputFormat("regex", "[a-", "structured_outputs.regex"), r"^structured_outputs.regex: .*unclosed"),
    (OutputFormat("choice", "not a list", "structured_outputs.choice"), r"^structured_outputs.choice: "),
    (OutputFormat("grammar", "start: nowhere", "structured_outputs.grammar"), r"^structured_outputs.grammar: "),
])
def test_a_format_that_does_not_compile_is_refused_when_added(loaded, grammar, fmt, message):
    engine = LLMEngine(loaded.model, loaded.tokenizer.eos_token_ids, grammar=grammar)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add(GenerationRequest("x", [1, 2], SamplingParams(output_format=fmt)), lambda out: None)
    assert not engine.has_work()


def test_an_engine_without_a_tokenizer_refuses_formats(loaded):
    engine = LLMEngine(loaded.model, loaded.tokenizer.eos_token_ids)
    with pytest.raises(InvalidRequestError, match="^response_format: this engine has no tokenizer"):
        engine.add(GenerationRequest("x", [1, 2], SamplingParams(output_format=json_schema_format({}))),
                   lambda out: None)


class BrokenGrammar(GrammarCompiler):
    """Fault injection: compiling fails with a bug (not a bad format), or a matcher fails in the middle of a step."""

    def __init__(self, loaded, fail_in: str):
        super().__init__(loaded.tokenizer, loaded.model.config.vocab_size)
        self.fail_in = fail_in

    def matcher(self, output_format):
        if self.fail_in == "add":
            raise RuntimeError("compiler bug")
        matcher = super().matcher(output_format)

        def allowed():
            raise RuntimeError("matcher bug")

        matcher.allowed = allowed
        return matcher


@pytest.mark.parametrize("fail_in", ["add", "step"])
def test_a_structured_output_bug_fails_its_request_and_the_engine_serves_on(loaded, fail_in):
    async def scenario():
        runner = AsyncEngine(LLMEngine(loaded.model, loaded.tokenizer.eos_token_ids,
                                       grammar=BrokenGrammar(loaded, fail_in)))
        runner.start()
        try:
            broken = GenerationRequest("json", [1, 2, 3], SamplingParams(output_format=json_schema_format({})))
            if fail_in == "add":
                with pytest.raises(RuntimeError, match="compiler bug"):
                    [out async for out in runner.generate(broken)]
            else:
                outs = [out async for out in runner.generate(broken)]
                assert outs[-1].finish_reason == "error" and "RuntimeError" in outs[-1].error
            plain = [out async for out in runner.generate(GenerationRequest("plain", [1, 2, 3], SamplingParams(
                max_tokens=3, ignore_eos=True)))]
            assert plain[-1].finish_reason == "length" and runner.is_alive
        finally:
            runner.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))  # a dead engine thread would leave the request hanging
