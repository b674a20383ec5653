"""What `llmosd cache ls|clear` sees: every file the weights cache holds, and which are stale.

Three kinds, all rebuildable, all under $XDG_CACHE_HOME/llmasos:

    kind    where                   made by                          stale when
    fp32    weights/*.safetensors   loaders/cache.py (a GGUF's       its source is gone or changed
                                    dequantized weights)             (its name is then never asked)
    int8    weights/int8/*          quant/cache.py (a CPU int8       its source is gone or changed,
                                    recipe's packed weights)         or its layout version is old
    probes  probes.json             model/probe_cache.py (which      never (keys that no longer
                                    matmul kernel is fastest)        match are simply not asked)

Partial writes of a live load (*.tmp<pid>) are not listed. Clearing is safe while a daemon
runs: a load holding an entry open keeps it (POSIX unlink), and the next miss rebuilds it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from llmasos.drivers.loaders.cache import cache_path
from llmasos.drivers.model.probe_cache import probes_path
from llmasos.drivers.quant.cache import CACHE_VERSION as INT8_VERSION


@dataclass(frozen=True)
class Entry:
    """One file in the cache, as `llmosd cache ls` lists it."""

    path: Path
    size: int
    kind: str     # "fp32", "int8" or "probes" (the table above)
    source: str   # the model file it was made from ("" if none or unreadable)
    stale: bool   # no load will ever read it again
    note: str = ""


def entries(weights_dir: str) -> list[Entry]:
    """Every entry, newest first within a kind: fp32, then int8, then the probes file."""
    root = Path(weights_dir)
    found = [_fp32(f, weights_dir) for f in _newest(root.glob("*.safetensors"))]
    found += [_int8(f) for f in _newest((root / "int8").glob("*.safetensors"))]
    probes = probes_path(weights_dir)
    if probes.is_file():
        found.append(_probes(probes))
    return found


def clear(weights_dir: str, stale_only: bool = False) -> list[Entry]:
    """Delete entries (only those no load can read, with stale_only); returns what went."""
    gone = [e for e in entries(weights_dir) if e.stale or not stale_only]
    for e in gone:
        e.path.unlink(missing_ok=True)
    return gone


def _newest(files: object) -> list[Path]:
    return sorted(files, key=lambda f: f.stat().st_mtime, reverse=True)


def _metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged entry is listed (and clearable), not fatal
        return {}


def _fp32(file: Path, weights_dir: str) -> Entry:
    source = _metadata(file).get("source", "")
    stale = not source or not os.path.isfile(source) or cache_path(source, weights_dir) != file
    return Entry(file, file.stat().st_size, "fp32", source, stale)


def _int8(file: Path) -> Entry:
    meta = _metadata(file)
    source = meta.get("source", "")
    stale = not source or not os.path.isfile(source) or \
        meta.get("version", INT8_VERSION) != INT8_VERSION or _source_changed(source, meta, file)
    return Entry(file, file.stat().st_size, "int8", source, stale)


def _source_changed(source: str, meta: dict[str, str], file: Path) -> bool:
    st = os.stat(source)
    if "source_mtime_ns" in meta:
        return meta["source_mtime_ns"] != str(st.st_mtime_ns) or \
            meta.get("source_size") != str(st.st_size)
    return st.st_mtime > file.stat().st_mtime   # written before the source's size was kept


def _probes(file: Path) -> Entry:
    try:
        answers = len(json.loads(file.read_text()))
    except (OSError, ValueError, TypeError):
        answers = 0
    return Entry(file, file.stat().st_size, "probes", "", False, f"{answers} probe answers")
