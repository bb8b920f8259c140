"""Structured output: a request's tokens confined to a JSON schema, a regular expression, a list of choices or a
grammar (Lark or llama.cpp's GBNF). llguidance (the library llama.cpp and vLLM use) compiles the format against the
model's tokenizer and, at every step, says which tokens may come next; the sampler masks out the rest."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import InvalidRequestError
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FormatKind = Literal["json", "regex", "choice", "grammar"]
# JSON as Python's json.dumps writes it, and no free whitespace: a small model given free whitespace can fill
# max_tokens with blanks (the classic JSON-mode failure).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class OutputFormat:
    """What a request's output must match. kind "json": `spec` is a JSON schema as JSON text ('{"type": "object"}'
    is any object); "regex": a regular expression (Rust regex syntax) the whole output matches; "choice": a JSON
    list of the allowed outputs; "grammar": a Lark or GBNF grammar. `param` names the request field it came from,
    for error messages."""

    kind: FormatKind
    spec: str
    param: str = "response_format"

    def grammar(self) -> str:
        """The llguidance grammar of this format; InvalidRequestError("param: ...") if the spec cannot be read."""
        import llguidance

        try:
            if self.kind == "json":
                return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)
            return llguidance.grammar_from(self.kind, self.spec)
        except ValueError as e:
            raise InvalidRequestError(f"{self.param}: {e}") from e


class TokenMatcher:
    """One request's place in its format: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher  # llguidance.LLMatcher
        self._words = (vocab_size + 31) // 32
        self._bits = torch.arange(32, dtype=torch.int32)
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool on the CPU: the tokens that keep the output on a path the format accepts (an end of
        sequence token only where the output is complete)."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)[:self._words]
        return ((words[:, None] >> self._bits) & 1).flatten()[:self.vocab_size].bool()

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            log.warning("structured output: token %d left the format (%s)", token_id, self._matcher.get_error())

    @property
    def done(self) -> bool:
        """Nothing more can follow (the output is complete), or the matcher failed: the request should end."""
        return self._matcher.is_stopped() or self._matcher.is_error()


class GrammarCompiler:
    """Compiles OutputFormats for one tokenizer. The llguidance tokenizer is built on first use (about 0.6 s for
    SmolLM2's 49k tokens), so servers that never see a structured request never pay for it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    def _llguidance_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer.hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(self.tokenizer.eos_token_ids))
            return self._ll_tokenizer

    def matcher(self, output_format: OutputFormat) -> TokenMatcher:
        """A fresh matcher at the start of the format; InvalidRequestError("param: why") for a format that does not
        compile (a bad schema, regex or grammar), before any work is done."""
        import llguidance

        grammar = output_format.grammar()
        tokenizer = self._llguidance_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidRequestError(f"{output_format.param}: {_one_line(error)}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{output_format.param}: {_one_line(matcher.get_error())}")
        return TokenMatcher(matcher, self.vocab_size)


def _one_line(error: str) -> str:
    """llguidance's multi-line message (source excerpts, carets) as one line for an API error."""
    lines = [line.strip() for line in error.splitlines()]
    return "; ".join(line for line in lines if line and set(line) != {"^"})


def json_schema_format(schema: object, param: str = "response_format") -> OutputFormat:
    """An OutputFormat from a schema given as a dict (or already as JSON text)."""
    return OutputFormat("json", schema if isinstance(schema, str) else json.dumps(schema), param)
