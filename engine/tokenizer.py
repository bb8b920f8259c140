"""Text <-> token ids for one model: a thin wrapper over a transformers fast tokenizer (from an HF folder or a
GGUF file's metadata) with chat-template rendering, plus the two streaming helpers the engine needs:
an incremental detokenizer and a stop-string matcher."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from famserve.engine.errors import CheckpointError, InvalidRequestError

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")
_REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that do not (yet) form a whole UTF-8 character
# Prompt tokens the incremental detokenizer decodes as context, so the first output token gets the spacing it has
# in a full decode (SentencePiece strips the leading space of the first token of any decode).
_CONTEXT_TOKENS = 5


class Tokenizer:
    """Encode, decode and render chats for one model."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None,
                 source: str = "") -> None:
        self._hf = hf_tokenizer
        self.source = source  # the file or folder it came from, for messages
        self.vocab_size: int = len(hf_tokenizer)  # token ids the tokenizer can produce, added tokens included
        self.bos_token_id: int | None = bos_token_id if bos_token_id is not None else hf_tokenizer.bos_token_id
        eos = list(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in eos:
            eos.append(hf_tokenizer.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos)
        template = getattr(hf_tokenizer, "chat_template", None)
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self._special_ids = frozenset(hf_tokenizer.all_special_ids)

    @classmethod
    def from_hf_folder(cls, folder: Path, eos_token_ids: Sequence[int] = (),
                       bos_token_id: int | None = None) -> "Tokenizer":
        """Load tokenizer.json / tokenizer_config.json (and chat_template.jinja) from a model folder."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... depending on what is wrong
            raise CheckpointError(f"{folder}: cannot load the tokenizer: {exc}") from exc
        return cls(hf, eos_token_ids, bos_token_id, source=str(folder))

    @classmethod
    def from_gguf(cls, path: Path, metadata: Mapping[str, Any] | None = None, eos_token_ids: Sequence[int] = (),
                  bos_token_id: int | None = None) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes. Given the file's already-parsed metadata, this converts it
        directly (0.3 s for SmolLM2); otherwise transformers re-reads the whole file (5-7 s)."""
        hf = _fast_tokenizer_from_gguf_metadata(metadata) if metadata is not None else None
        if hf is None:
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot build the tokenizer from the GGUF metadata: {exc}") from exc
        return cls(hf, eos_token_ids, bos_token_id, source=str(path))

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer (for tests and tools; the engine uses the methods below)."""
        return self._hf

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # No clean-up of spaces: it would make a decode of a window differ from the same part of a full decode.
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of these messages."""
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template; use the completions endpoint instead")
        checked = _check_messages(messages)
        try:
            return self._hf.apply_chat_template(checked, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:  # the template's own raise_exception(), e.g. roles that do not alternate
            raise InvalidRequestError(f"the chat template refused the messages: {exc}") from exc

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; special tokens come from the template text, none are added."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate roles and flatten OpenAI content parts ([{"type": "text", "text": ...}]) into one string."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages: must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}]: must be an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role: {role!r} is not one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content: must be a string or a list of text parts")
        checked.append({**message, "content": content})
    return checked


def _gguf_tokenizer_converter() -> Any | None:
    """transformers' GGUF-metadata -> tokenizers converter; its module moved between releases, so look in both."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        try:
            from transformers.integrations.ggml import convert_gguf_tokenizer  # transformers 4.x
        except ImportError:
            return None
    return convert_gguf_tokenizer


def _fast_tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> Any | None:
    """Convert already-parsed GGUF metadata with transformers' own converter, skipping its second read of the file.
    Returns None when this transformers has no such converter, so the caller takes the public (slower) path."""
    convert = _gguf_tokenizer_converter()
    tokens = metadata.get("tokenizer.ggml.tokens")
    if convert is None or not tokens:
        return None
    from transformers import PreTrainedTokenizerFast

    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
            "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
            "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id",
            "add_space_prefix": "add_prefix_space"}
    tokenizer_dict = {name: metadata[f"tokenizer.ggml.{key}"] for key, name in keys.items()
                      if f"tokenizer.ggml.{key}" in metadata}
    kwargs: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            kwargs[name] = tokens[token_id]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in metadata:
            kwargs[flag] = bool(metadata[f"tokenizer.ggml.{flag}"])
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        kwargs["chat_template"] = metadata["tokenizer.chat_template"]
    try:
        backend, extra = convert(metadata.get("general.architecture", ""), tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **{**kwargs, **extra})
    except Exception as exc:  # an internal API of transformers: if it changed shape, use the public path
        logger.info("direct GGUF tokenizer conversion failed (%s); using AutoTokenizer", exc)
        return None


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation equals a full decode.

    Each push decodes only a short window (ids from prefix_offset on) and emits what the newest tokens added,
    like vLLM's prefix/read offsets. A window ending in U+FFFD is a UTF-8 character still missing bytes: it is
    held back until a later token completes it (or flush() gives up and emits it).
    One exception to the equality: with SentencePiece byte fallback, a full decode turns a whole run of <0xNN>
    tokens into U+FFFDs when the run is not valid UTF-8, while the stream has already sent its valid start."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prefix_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prefix_ids)[-_CONTEXT_TOKENS:]
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._ids)  # ids before this are already emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often '', never half a character)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or a character still waiting for its remaining bytes
        new_text = full_text[len(prefix_text):]
        # The window restarts at the last complete point; older ids are no longer needed.
        del self._ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return new_text


class StopStringMatcher:
    """Cuts a text stream at the first stop string, even one split across pushes. Text that could be the start of
    a stop string is held back until it is known not to be; the stop string itself is never emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)  # an empty stop string would match everywhere; OpenAI ignores it
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        self._buffer += text
        hit = min(((self._buffer.find(s), s) for s in self._stops if s in self._buffer), default=None,
                  key=lambda found: found[0])
        if hit is not None:
            index, self.matched = hit
            self.stopped = True
            out, self._buffer = self._buffer[:index], ""
            return out, True
        hold = self._held_suffix_length()
        out = self._buffer[:len(self._buffer) - hold]
        self._buffer = self._buffer[len(self._buffer) - hold:]
        return out, False

    def flush(self) -> str:
        """The held-back text, once the stream has ended without a stop string."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out

    def _held_suffix_length(self) -> int:
        """Length of the longest tail of the buffer that is a proper prefix of some stop string."""
        longest = min(len(self._buffer), max(len(s) for s in self._stops) - 1)
        for k in range(longest, 0, -1):
            tail = self._buffer[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
