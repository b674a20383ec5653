"""Cache of dequantized GGUF weights as safetensors under $XDG_CACHE_HOME/llmasos/weights (default
~/.cache/llmasos/weights), so the second load skips dequantization. Keyed by the file's absolute
path, size and mtime. What is here can always be rebuilt: `llmosd cache ls|clear` manage it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from safetensors.torch import save_file

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.loaders.gguf import load_gguf
from llmasos.drivers.loaders.hf import load_hf, read_safetensors
from llmasos.drivers.loaders.progress import Report, mark

log = structlog.get_logger()
CACHE_VERSION = "1"  # bump when the stored layout changes


def weights_cache_dir() -> str:
    """$XDG_CACHE_HOME/llmasos/weights, the XDG base directory spec's place for rebuildable data."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "llmasos", "weights")


def cache_path(path: str, cache_dir: str) -> Path:
    st = os.stat(path)
    key = f"{CACHE_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{Path(path).stem}-{digest}.safetensors"


def load_cached_gguf(path: str, cache_dir: str, progress: bool = True,
                     report: Report | None = None,
                     ) -> tuple[ModelConfig, dict[str, torch.Tensor], bool]:
    """(config, fp32 weights, hit). Dequantizes and stores on a miss."""
    target = cache_path(path, cache_dir)
    if target.is_file():
        from safetensors import safe_open
        with safe_open(str(target), framework="pt") as f:
            cfg = ModelConfig.from_json(f.metadata()["config"])
        log.info("weights_cache_hit", path=path, cache=str(target))
        return cfg, read_safetensors([str(target)], progress, report), True
    cfg, weights = load_gguf(path, progress=progress, report=report)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    mark(report, "write", 0, 1, "files")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp),
              metadata={"config": cfg.to_json(), "source": os.path.abspath(path)})
    os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    log.info("weights_cached", path=path, cache=str(target))
    mark(report, "write", 1, 1, "files")
    return cfg, weights, False


def load_weights(path: str, cache_dir: str, progress: bool = True,
                 keep_quantized: bool = False, cache: bool = True,
                 report: Report | None = None) -> tuple[ModelConfig, dict, str]:
    """Load a GGUF file (through the cache) or an HF folder; returns (config, weights, source).
    keep_quantized: GGUF Q8_0/Q4_1 projections stay quantized (the GPU path; no cache).
    cache=False: a model quantized after load dequantizes in memory only; it reads an existing
    cache entry but never writes one (an fp32 copy on disk would defeat the quantization).
    report: hears each tensor read or dequantized (drivers/loaders/progress.py)."""
    if os.path.isdir(path):
        cfg, weights = load_hf(path, progress=progress, report=report)
        return cfg, weights, "safetensors"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file or folder: {path}")
    if keep_quantized:
        cfg, weights = load_gguf(path, progress=progress, keep_quantized=True, report=report)
        return cfg, weights, "gguf"
    if not cache and not cache_path(path, cache_dir).is_file():
        cfg, weights = load_gguf(path, progress=progress, report=report)
        return cfg, weights, "gguf"
    cfg, weights, _ = load_cached_gguf(path, cache_dir, progress=progress, report=report)
    return cfg, weights, "gguf"


@dataclass(frozen=True)
class Entry:
    """One converted file in the cache, as `llmosd cache ls` lists it."""

    path: Path
    size: int
    source: str   # the GGUF file it was converted from ("" if unreadable)
    stale: bool   # the source is gone or changed since: a load would never hit this entry


def entries(cache_dir: str) -> list[Entry]:
    """The cache's entries, newest first; partial writes of a live load (.tmp*) are not listed."""
    from safetensors import safe_open
    found = []
    for file in Path(cache_dir).glob("*.safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                source = f.metadata().get("source", "")
        except Exception:  # noqa: BLE001 - a damaged entry is listed (and clearable), not fatal
            source = ""
        stale = not source or not os.path.isfile(source) or cache_path(source, cache_dir) != file
        found.append(Entry(file, file.stat().st_size, source, stale))
    return sorted(found, key=lambda e: e.path.stat().st_mtime, reverse=True)


def clear(cache_dir: str, stale_only: bool = False) -> list[Entry]:
    """Delete entries (only those no load can hit, with stale_only); returns what went. A load in
    progress keeps its open file (POSIX unlink) and rewrites the entry on its next miss."""
    gone = [e for e in entries(cache_dir) if e.stale or not stale_only]
    for e in gone:
        e.path.unlink(missing_ok=True)
    return gone
