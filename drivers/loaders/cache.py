"""Cache of dequantized GGUF weights as safetensors under <state_dir>/cache/, so the second load
skips dequantization. Keyed by the file's absolute path, size and mtime."""

from __future__ import annotations

import hashlib
import os
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


def default_state_dir() -> str:
    return os.environ.get("LLMASOS_HOME") or os.path.expanduser("~/.local/state/llmasos")


def cache_path(path: str, state_dir: str) -> Path:
    st = os.stat(path)
    key = f"{CACHE_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(state_dir) / "cache" / f"{Path(path).stem}-{digest}.safetensors"


def load_cached_gguf(path: str, state_dir: str, progress: bool = True,
                     report: Report | None = None,
                     ) -> tuple[ModelConfig, dict[str, torch.Tensor], bool]:
    """(config, fp32 weights, hit). Dequantizes and stores on a miss."""
    target = cache_path(path, state_dir)
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


def load_weights(path: str, state_dir: str, progress: bool = True,
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
    if not cache and not cache_path(path, state_dir).is_file():
        cfg, weights = load_gguf(path, progress=progress, report=report)
        return cfg, weights, "gguf"
    cfg, weights, _ = load_cached_gguf(path, state_dir, progress=progress, report=report)
    return cfg, weights, "gguf"
