"""A GGUF file's probe, kept: its scalar metadata and its built tokenizer, so that a restart does
not read ~100k vocabulary strings and rebuild the BPE (0.3-0.6 s of every inference service's
start on these machines; the kernel's reboot waits on it).

One JSON file per source under $XDG_CACHE_HOME/llmasos/weights/tokenizers/, keyed like the
weights cache by the source's path, size and mtime: a changed file is probed again. A cache that
cannot be read is no error: the file is probed as if none were there."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import structlog
import tokenizers

from llmasos.drivers.loaders.cache import weights_cache_dir
from llmasos.drivers.tokenizer import Tokenizer

log = structlog.get_logger()
VERSION = 1
VOCAB_LISTS = 1000   # list values at least this long are the vocabulary: not kept


def cache_file(path: str, cache_dir: str | None = None) -> Path:
    st = os.stat(path)
    key = f"{VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    folder = Path(cache_dir or weights_cache_dir()) / "tokenizers"
    return folder / f"{Path(path).stem}-{digest}.json"


def small(meta: dict[str, object]) -> dict[str, object]:
    """The metadata without its vocabulary lists (the config reads only their length)."""
    out = {k: v for k, v in meta.items()
           if not (isinstance(v, list) and len(v) >= VOCAB_LISTS)}
    tokens = meta.get("tokenizer.ggml.tokens")
    arch = meta.get("general.architecture")
    if isinstance(tokens, list) and arch and f"{arch}.vocab_size" not in out:
        out[f"{arch}.vocab_size"] = len(tokens)
    return out


def load(path: str) -> tuple[dict[str, object], Tokenizer] | None:
    """(scalar metadata, tokenizer) as kept for this file, or None."""
    try:
        kept = json.loads(cache_file(path).read_text())
        t = kept["tokenizer"]
        backend = tokenizers.Tokenizer.from_str(kept["backend"])
        return kept["meta"], Tokenizer(backend, t["bos"], t["eos"], t["template"], t["special"])
    except Exception as err:  # noqa: BLE001 - any unreadable cache is a miss
        if not isinstance(err, FileNotFoundError):
            log.warning("probe_cache_unreadable", path=path, error=str(err)[:200])
        return None


def save(path: str, meta: dict[str, object], tok: Tokenizer) -> None:
    """Keep the probe (written whole, then renamed: a reader never sees half a file)."""
    target = cache_file(path)
    kept = {"source": os.path.abspath(path), "meta": small(meta), "backend": tok.backend.to_str(),
            "tokenizer": {"bos": tok.bos_token_id, "eos": tok.eos_token_id,
                          "template": tok.chat_template.source if tok.chat_template else None,
                          "special": tok.special_tokens}}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f)
        os.replace(tmp, target)
    except (OSError, TypeError, ValueError) as err:   # a read-only cache only costs time
        log.warning("probe_cache_not_written", path=path, error=str(err)[:200])
