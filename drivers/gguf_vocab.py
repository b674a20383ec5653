"""A GGUF's vocabulary as a `tokenizers` backend, built the way HF's GGUF converter builds it.

Two tokenizer models are in use (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE. The vocabulary is spelled in GPT-2's byte alphabet, the merges are in the
  file, and the split regex is picked by `tokenizer.ggml.pre`. A `pre` we do not know is refused by
  name: silently splitting with another regex gives wrong ids that nothing downstream notices.
- "llama": SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama, CodeLlama, Gemma,
  Phi-3). Spaces become "▁" and a "▁" is prepended (the legacy Llama tokenizer.json and
  sentencepiece itself; llama.cpp's `add_space_prefix`), bytes the vocabulary lacks become
  <0xNN> tokens, and merges missing from the file are recovered from the token scores.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
SPIECE_SPACE = "\u2581"  # "▁"

# Split regexes by `tokenizer.ggml.pre`, as HF's GGUF converter has them. None: GPT-2's own
# ByteLevel regex. "smollm": llama.cpp splits digits one by one first, HF does not; the ids only
# differ for a space before a non-ASCII numeral (" ²"), and we follow HF.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX: dict[str, str | None] = {
    "default": None, "gpt-2": None, "gpt2": None, "phi-2": None, "smollm": None, "olmo": None,
    "jina-es": None, "jina-de": None, "jina-v1-en": None, "jina-v2-es": None, "jina-v2-de": None,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3, "pixtral": _LLAMA3,
    "lfm2": _LLAMA3, "midm-2.0": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2,
    "gpt-4o": _GPT4O, "llama4": _GPT4O, "tekken": _TEKKEN,
}  # fmt: skip


class UnsupportedTokenizer(ValueError):
    """The file's tokenizer model or pre-tokenizer is one we cannot reproduce exactly."""


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@cache
def byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


def _spell_bytes(token: str) -> str:
    """A vocabulary entry in the byte alphabet (GGUFs store a few entries as raw text)."""
    alphabet = byte_decoder()
    if all(c in alphabet for c in token):
        return token
    return "".join(byte_alphabet()[b] for b in token.encode("utf-8"))


def check_vocab(meta: dict[str, object]) -> None:
    """Raise UnsupportedTokenizer unless the file's tokenizer can be built exactly (cheap)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise UnsupportedTokenizer(
            f"GGUF tokenizer model {kind!r} is not supported; supported: {sorted(BUILDERS)}")
    if not meta.get("tokenizer.ggml.tokens"):
        raise UnsupportedTokenizer("the GGUF file has no tokenizer.ggml.tokens vocabulary")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if kind == "gpt2" and pre not in SPLIT_REGEX:
        raise UnsupportedTokenizer(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(SPLIT_REGEX)}")


def build_vocab(meta: dict[str, object]) -> tokenizers.Tokenizer:
    """The backend for the file's tokenizer, its control and user-defined tokens added."""
    check_vocab(meta)
    backend = BUILDERS[str(meta["tokenizer.ggml.model"])](meta)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]  # type: ignore[assignment]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)  # type: ignore[assignment]
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    alphabet = set(byte_decoder())
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=True)
        # a byte-level control token off the byte alphabet is a llama.cpp mislabel
        if kind == TOKEN_CONTROL and (not byte_level or set(t) <= alphabet)
    ])  # fmt: skip
    vocab = backend.get_vocab()
    backend.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == TOKEN_USER_DEFINED and t in vocab
    ])  # fmt: skip
    return backend


def byte_level(meta: dict[str, object]) -> tokenizers.Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]  # type: ignore[assignment]
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []  # type: ignore[assignment]
    vocab = {_spell_bytes(t): i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    split = SPLIT_REGEX[str(meta.get("tokenizer.ggml.pre") or "default")]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    return backend


def sentencepiece(meta: dict[str, object]) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback, as the legacy Llama tokenizer.json spells it."""
    arch = str(meta.get("general.architecture", ""))
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])  # type: ignore[arg-type]
    gemma = arch.startswith("gemma")
    if gemma:  # Gemma stores runs of spaces as spaces; its merges follow the file's order
        tokens = [SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # type: ignore[union-attr]
    else:
        scores = {t: -i for i, t in enumerate(tokens)} if gemma else dict(
            zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens), strict=True))
        merges = merges_from_scores(vocab, scores)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None  # type: ignore[arg-type]
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPIECE_SPACE)] if prefix else [])
        + [normalizers.Replace(" ", SPIECE_SPACE)])
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(
        steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]
                       ) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best score first (HF's
    generate_merges): SentencePiece BPE merges in score order, so this recovers its merges."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


BUILDERS: dict[str, Callable[[dict[str, object]], tokenizers.Tokenizer]] = {
    "gpt2": byte_level,
    "llama": sentencepiece,
}
