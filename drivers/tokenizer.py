"""The tokenizer on the `tokenizers` library, from GGUF metadata or a HF folder.

Built to give the same ids as HF transformers' tokenizer for the same file; drivers/gguf_vocab.py
builds a GGUF's vocabulary (byte-level BPE or SentencePiece BPE with byte fallback). Prompts get
BOS/EOS as the file says (`add_bos_token`), chat prompts never a second BOS.
"""

from __future__ import annotations

import codecs
import json
import mmap
import os
import struct
from pathlib import Path

import structlog
import tokenizers
from gguf import GGUF_MAGIC, GGUFValueType
from tokenizers import decoders, processors

from llmasos.drivers.chat_template import ChatTemplate
from llmasos.drivers.gguf_vocab import (
    UnsupportedTokenizer,
    build_vocab,
    byte_alphabet,
    byte_decoder,
    check_vocab,
)

__all__ = ["IncrementalDetokenizer", "Tokenizer", "UnsupportedTokenizer", "byte_alphabet",
           "check_vocab", "read_gguf_metadata"]

log = structlog.get_logger()

# Tokens that end a chat turn (counted as end-of-sequence when the template uses them) and tokens
# that end a document (always counted when the vocabulary has them as special tokens).
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


# struct formats of GGUF's scalar value types
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The key/value section of a GGUF file (v2/v3, little-endian), without the tensors.

    GGUFReader makes one numpy view per string, which takes 2-4 s for a 49k-token vocabulary;
    walking the same bytes with struct takes a tenth of a second.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _, count = struct.unpack_from("<IIQQ", buf, 0)
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file")
        offset, meta = 24, {}
        for _ in range(count):
            key, offset = _gguf_string(buf, offset)
            (kind,) = struct.unpack_from("<I", buf, offset)
            meta[key], offset = _gguf_value(buf, offset + 4, GGUFValueType(kind))
        return meta


def _gguf_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("<Q", buf, offset)
    end = offset + 8 + size
    return buf[offset + 8 : end].decode("utf-8", "replace"), end


def _gguf_value(buf: mmap.mmap, offset: int, kind: GGUFValueType) -> tuple[object, int]:
    if kind == GGUFValueType.STRING:
        return _gguf_string(buf, offset)
    if kind in _SCALAR:
        return struct.unpack_from(_SCALAR[kind], buf, offset)[0], offset + struct.calcsize(
            _SCALAR[kind]
        )
    item, count = struct.unpack_from("<IQ", buf, offset)
    offset += 12
    item = GGUFValueType(item)
    if item in _SCALAR:  # numeric arrays in one read
        fmt = _SCALAR[item]
        end = offset + count * struct.calcsize(fmt)
        return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, offset)), end
    values = []
    for _ in range(count):
        value, offset = _gguf_value(buf, offset, item)
        values.append(value)
    return values, offset


def _reader_metadata(reader: object) -> dict[str, object]:
    fields = reader.fields  # type: ignore[attr-defined]
    return {k: f.contents() for k, f in fields.items()
            if k.startswith("tokenizer.") or k == "general.architecture"}


class Tokenizer:
    """Text ↔ ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        extra_eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = (
            ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        )
        self.eos_token_ids: list[int] = self._end_ids(extra_eos_ids)
        self._token_bytes: list[bytes] | None = None

    # ---- construction ----

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, reader: object | None = None) -> Tokenizer:
        """Build from a GGUF's tokenizer metadata; pass `reader` to reuse an open GGUFReader."""
        meta = read_gguf_metadata(path) if reader is None else _reader_metadata(reader)
        log.debug("tokenizer.gguf", path=str(path))
        return cls.from_gguf_metadata(meta)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, object]) -> Tokenizer:
        """Build from GGUF metadata already read (read_gguf_metadata)."""
        backend = build_vocab(meta)
        tokens: list[str] = meta["tokenizer.ggml.tokens"]  # type: ignore[assignment]
        pre = meta.get("tokenizer.ggml.pre")

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)  # type: ignore[arg-type]

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        unk, pad = token_id("unknown_token_id"), token_id("padding_token_id")
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
        add_bos = meta.get("tokenizer.ggml.add_bos_token",
                           meta["tokenizer.ggml.model"] == "llama")
        _set_post_processor(backend, tokens, bos if add_bos else None,
                            eos if meta.get("tokenizer.ggml.add_eos_token") else None)
        names = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
        special = {k: tokens[v] for k, v in names.items() if v is not None and v < len(tokens)}
        template: str | None = meta.get("tokenizer.chat_template")  # type: ignore[assignment]
        log.debug("tokenizer.gguf", vocab=len(tokens), pre=pre)
        return cls(backend, bos, eos, template, special)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a HF folder: tokenizer.json, tokenizer_config.json, chat template."""
        folder = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        special = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        bos = _token_id(backend, special["bos_token"])
        eos = _token_id(backend, special["eos_token"])
        generation = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra = generation if isinstance(generation, list) else [generation]
        extra_ids = tuple(int(i) for i in extra if i is not None)
        if eos is None and extra_ids:
            eos = extra_ids[0]
        if "add_bos_token" in config or "add_eos_token" in config:  # as HF's update_post_processor
            vocab = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
            _set_post_processor(
                backend, vocab, bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None, keep_if_none=False)
        log.debug("tokenizer.hf", path=str(folder), vocab=backend.get_vocab_size())
        return cls(backend, bos, eos, _hf_chat_template(folder, config), special, extra_ids)

    def _end_ids(self, extra: tuple[int, ...]) -> list[int]:
        """eos, the model's own extras, turn ends its template uses, and document ends."""
        ids = [i for i in (self.eos_token_id, *extra) if i is not None]
        source = self.chat_template.source if self.chat_template else ""
        wanted = [t for t in TURN_END_TOKENS if t in source] + list(DOCUMENT_END_TOKENS)
        for text in wanted:
            token = self.backend.token_to_id(text)
            if token is not None and token in self.special_ids:
                ids.append(token)
        return list(dict.fromkeys(ids))

    # ---- text ↔ ids ----

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain prompt as HF's tokenizer(text) and llama.cpp give it: BOS/EOS as the file
        says."""
        return self.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation through the chat template; BOS added as for a plain prompt unless the
        template already wrote it (never twice)."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt=True))
        if self.adds_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
        return ids

    @property
    def adds_bos(self) -> bool:
        """Does a plain prompt get BOS (the file's add_bos_token)?"""
        return self.bos_token_id is not None and \
            self.encode("", add_special_tokens=True)[:1] == [self.bos_token_id]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def token_bytes(self) -> list[bytes] | None:
        """Each id's bytes when the decoder is byte-level (what decode concatenates), else None."""
        if self._token_bytes is None and isinstance(self.backend.decoder, decoders.ByteLevel):
            alphabet = byte_decoder()
            table = []
            for i in range(self.vocab_size):
                token = self.backend.id_to_token(i) or ""
                # the ByteLevel decoder passes a token through as text if any char is off-alphabet
                if all(c in alphabet for c in token):
                    table.append(bytes(alphabet[c] for c in token))
                else:
                    table.append(token.encode("utf-8"))
            self._token_bytes = table
        return self._token_bytes


def _set_post_processor(
    backend: tokenizers.Tokenizer, tokens: list[str] | dict[int, str], bos: int | None,
    eos: int | None, keep_if_none: bool = True,
) -> None:
    """encode(add_special_tokens=True) adds BOS/EOS only where the file says to."""
    if bos is None and eos is None:
        if not keep_if_none:
            backend.post_processor = None
        return
    pieces = ([f"{tokens[bos]}"] if bos is not None else []) + ["$A"]
    pieces += [f"{tokens[eos]}"] if eos is not None else []
    specials = [(tokens[i], i) for i in (bos, eos) if i is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(pieces), pair=" ".join(pieces + ["$B:1"]), special_tokens=specials
    )


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: object) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken-shaped dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _token_id(backend: tokenizers.Tokenizer, text: str | None) -> int | None:
    return None if text is None else backend.token_to_id(text)


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    """The default template: chat_template.jinja, chat_template.json, or tokenizer_config.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    template = template or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


class IncrementalDetokenizer:
    """Token ids in, text out, one id at a time, never splitting a UTF-8 character.

    Byte-level vocabularies go through a table of each id's bytes and an incremental UTF-8
    decoder, which holds back the bytes of an unfinished character and replaces invalid ones
    as `decode` does. Other vocabularies re-decode a short window (vLLM's prefix/read offsets).
    The concatenation of every push plus `flush()` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._table = tokenizer.token_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        skip = self.skip_special_tokens and token_id in self.tokenizer.special_ids
        if self._table is not None:
            if skip:
                return ""
            data = self._table[token_id] if 0 <= token_id < len(self._table) else b""
            return self._utf8.decode(data)
        if not skip:
            self._ids.append(token_id)
        return self._window(final=False)

    def flush(self) -> str:
        """Whatever is held back, as decode would render it (U+FFFD for an unfinished char)."""
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        return self._window(final=True)

    def _window(self, final: bool) -> str:
        decode = self.tokenizer.decode
        ids = self._ids
        prefix = decode(ids[self._prefix_offset : self._read_offset])
        text = decode(ids[self._prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return text[len(prefix) :]
