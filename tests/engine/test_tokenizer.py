"""Tokenizer tests: round trips, chat templates and their errors, the GGUF-built tokenizer against the folder's,
streaming detokenization (byte-level BPE and SentencePiece-style byte fallback) and stop strings."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tiny_models import TINY_SPECIAL_TOKENS

from famserve.engine.errors import InvalidRequestError
from famserve.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

TEXTS = [
    "Hello world!",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "emoji 😀👍🏽 and flags 🇫🇷 in text",
    "中文字符和日本語のテキスト, кириллица, ñandú",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_folder(tiny_llama_dir)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> Tokenizer:
    """A Llama-2-style tokenizer: '▁' for spaces, <0xNN> byte-fallback tokens, leading space stripped on decode."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.train_from_iterator(["the cat sat on the mat", "hello world, hello there"] * 3, trainer)
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    sp = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.normalizer = raw.normalizer
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Tokenizer(hf)


def test_properties(tiny_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.vocab_size == 320
    assert tiny_tokenizer.bos_token_id == 1 and tiny_tokenizer.eos_token_ids == (2,)
    assert tiny_tokenizer.chat_template is not None
    assert [tiny_tokenizer.encode(t) for t in TINY_SPECIAL_TOKENS] == [[0], [1], [2]]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny_tokenizer: Tokenizer, text: str) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_skip_special_tokens(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template_rendering(tiny_tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tiny_tokenizer.render_chat(messages)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.render_chat(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    ids = tiny_tokenizer.apply_chat_template(messages)
    assert ids == tiny_tokenizer.encode(rendered) and ids[0] == 1 and ids.count(2) == 2


def test_content_parts_are_flattened(tiny_tokenizer: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert tiny_tokenizer.render_chat([{"role": "user", "content": parts}]) == tiny_tokenizer.render_chat(
        [{"role": "user", "content": "Hello there"}])


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role: 'wizard'"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role: None"),
    ([{"role": "user", "content": 42}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    (["just a string"], "messages[0]"),
])
def test_bad_messages(tiny_tokenizer: Tokenizer, messages: list, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        tiny_tokenizer.apply_chat_template(messages)
    assert fragment in str(caught.value)


def _with_template(tiny_llama_dir: Path, tmp_path: Path, template: str | None) -> Tokenizer:
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_hf_folder(folder)


def test_model_without_template(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tokenizer = _with_template(tiny_llama_dir, tmp_path, None)
    assert tokenizer.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_exception_is_invalid_request(tiny_llama_dir: Path, tmp_path: Path) -> None:
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    tokenizer = _with_template(tiny_llama_dir, tmp_path, template)
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(InvalidRequestError, match="System role not supported"):
        tokenizer.render_chat([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("use_metadata", [True, False], ids=["from-metadata", "via-transformers"])
def test_gguf_tokenizer_equals_folder_tokenizer(tiny_tokenizer: Tokenizer, tiny_gguf_file: Path,
                                                use_metadata: bool) -> None:
    from famserve.engine.weights_io import GGUFFile

    metadata = GGUFFile(tiny_gguf_file).metadata if use_metadata else None
    from_gguf = Tokenizer.from_gguf(tiny_gguf_file, metadata)
    assert (from_gguf.vocab_size, from_gguf.bos_token_id, from_gguf.eos_token_ids, from_gguf.chat_template) == (
        tiny_tokenizer.vocab_size, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_ids,
        tiny_tokenizer.chat_template)
    for text in TEXTS:
        assert from_gguf.encode(text) == tiny_tokenizer.encode(text), text
    ids = list(range(from_gguf.vocab_size))
    assert from_gguf.decode(ids) == tiny_tokenizer.decode(ids)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True,
           prefix_ids: list[int] = ()) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens, prefix_ids)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    return pieces + [detokenizer.flush()]


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "sentencepiece_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_splits_a_character(request: pytest.FixtureRequest, tokenizer_name: str, text: str) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_streaming_random_ids_equals_full_decode(tiny_tokenizer: Tokenizer, skip_special_tokens: bool,
                                                 seed: int) -> None:
    """Byte-level BPE: exact for any ids at all, invalid UTF-8 included."""
    rng = random.Random(seed)
    ids = [rng.randrange(tiny_tokenizer.vocab_size) for _ in range(200)]
    pieces = stream(tiny_tokenizer, ids, skip_special_tokens)
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("seed", range(5))
def test_streaming_byte_fallback_equals_full_decode(sentencepiece_tokenizer: Tokenizer, seed: int) -> None:
    """SentencePiece byte fallback: random tokens mixed with <0xNN> runs that spell whole characters (a run of
    invalid UTF-8 is the documented exception)."""
    rng = random.Random(seed)
    hf = sentencepiece_tokenizer.hf_tokenizer
    words = [i for token, i in hf.get_vocab().items() if not token.startswith("<")]
    ids: list[int] = []
    for _ in range(100):
        if rng.random() < 0.3:
            char = rng.choice("😀中文ñ🇫🇷кä")
            ids += [hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in char.encode()]
        else:
            ids.append(rng.choice(words + [1, 2]))
    for skip in (True, False):
        pieces = stream(sentencepiece_tokenizer, ids, skip)
        assert "".join(pieces) == sentencepiece_tokenizer.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in piece for piece in pieces)


def test_streaming_with_prompt_prefix_keeps_leading_space(sentencepiece_tokenizer: Tokenizer) -> None:
    prompt = sentencepiece_tokenizer.encode("hello")
    reply = [sentencepiece_tokenizer.hf_tokenizer.get_vocab()["▁the"]]
    assert sentencepiece_tokenizer.decode(prompt + reply) == "hello the"
    assert "".join(stream(sentencepiece_tokenizer, reply, prefix_ids=prompt)) == " the"
    assert "".join(stream(sentencepiece_tokenizer, reply)) == "the"  # a decode of the reply alone strips it


STOP_CASES = {  # name: (stop strings, pushed chunks, text emitted in total, stopped)
    "no stop": (["END"], ["hello ", "world"], "hello world", False),
    "inside one chunk": (["END"], ["abcENDdef"], "abc", True),
    "across chunks": (["END"], ["abcE", "N", "Dxyz"], "abc", True),
    "held prefix released": (["END"], ["abE", "x"], "abEx", False),
    "held prefix at the end is flushed": (["END"], ["abcEN"], "abcEN", False),
    "overlapping prefixes": (["abcd", "bcx"], ["abc", "x"], "a", True),
    "earliest stop wins": (["world", "lo"], ["hello world"], "hel", True),
    "stop at the start": (["\n\n"], ["\n", "\nmore"], "", True),
    "shared prefix stops": (["aab", "ab"], ["aa", "b"], "", True),
    "multi-byte stop": (["🙂!"], ["ok 🙂", "! more"], "ok ", True),
    "no stop strings": ([], ["a", "b"], "ab", False),
    "empty stop string ignored": ([""], ["a"], "a", False),
}


@pytest.mark.parametrize("stops, chunks, expected, stopped", STOP_CASES.values(), ids=STOP_CASES.keys())
def test_stop_strings(stops: list[str], chunks: list[str], expected: str, stopped: bool) -> None:
    matcher = StopStringMatcher(stops)
    emitted, was_stopped = [], False
    for chunk in chunks:
        text, was_stopped = matcher.push(chunk)
        emitted.append(text)
        if was_stopped:
            break
    emitted.append(matcher.flush())
    assert ("".join(emitted), was_stopped) == (expected, stopped)


def test_stop_string_holds_back_only_what_could_match() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.push("abcE") == ("abc", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)
    assert matcher.matched == "END"
    assert matcher.push("later") == ("", True) and matcher.flush() == ""


# ------------------------------------------------------------------------------------------- the real model


@pytest.mark.model
def test_smollm2_template_inserts_default_system_prompt(smollm2_checkpoint) -> None:
    tokenizer = smollm2_checkpoint.tokenizer
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[:3] == [1, 9690, 198]
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_ids) == (49152, 1, (2,))


@pytest.mark.model
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_checkpoint, smollm2_path: Path) -> None:
    """Our conversion from already-parsed metadata must equal transformers' public GGUF path (about 7 s)."""
    from transformers import AutoTokenizer

    ours = smollm2_checkpoint.tokenizer
    reference = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                              local_files_only=True)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    assert ours.render_chat(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)
    ids = random.Random(0).sample(range(49152), 500)
    assert ours.decode(ids) == reference.decode(ids)


@pytest.mark.model
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_streaming(smollm2_checkpoint, text: str) -> None:
    tokenizer = smollm2_checkpoint.tokenizer
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
