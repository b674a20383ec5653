"""Cache of dequantized GGUF weights as safetensors under $XDG_CACHE_HOME/llmasos/weights (default
~/.cache/llmasos/weights), so the second load skips dequantization. Keyed by the file's absolute
path, size and mtime. What is here can always be rebuilt: `llmosd cache ls|clear` manage it.

A hit maps the file (drivers/loaders/mapped.py): one pass of the kernel, no read or copy per
tensor. The projections LlamaModel stacks into one matmul (Q/K/V, gate/up) are stored stacked,
and handed out as row views of the stack, so the model's stacking finds them adjacent and copies
nothing (llama.cat_rows)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import structlog
import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.loaders.gguf import load_gguf
from llmasos.drivers.loaders.hf import load_hf
from llmasos.drivers.loaders.mapped import map_safetensors, save_aligned
from llmasos.drivers.loaders.progress import Report, mark, tracked

log = structlog.get_logger()
CACHE_VERSION = "3"  # bump when the stored layout changes (3: stacked projections, aligned)
# per layer: the stack's name -> the projections it holds, in LlamaModel's order (Layer.qkv,
# Layer.gate_up)
STACKS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_stack.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                   "self_attn.v_proj.weight"),
    "mlp.gate_up_stack.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def weights_cache_dir() -> str:
    """$XDG_CACHE_HOME/llmasos/weights, the XDG base directory spec's place for rebuildable data."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "llmasos", "weights")


def cache_path(path: str, cache_dir: str) -> Path:
    real = os.path.realpath(path)   # one file under two names (a symlink) converts once
    st = os.stat(real)
    key = f"{CACHE_VERSION}|{real}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{Path(real).stem}-{digest}.safetensors"


def load_cached_gguf(path: str, cache_dir: str, progress: bool = True,
                     report: Report | None = None,
                     ) -> tuple[ModelConfig, dict[str, torch.Tensor], bool]:
    """(config, fp32 weights, hit). Dequantizes and stores on a miss."""
    target = cache_path(path, cache_dir)
    if target.is_file():
        stored, meta = map_safetensors(str(target))
        log.info("weights_cache_hit", path=path, cache=str(target))
        return ModelConfig.from_json(meta["config"]), unstack(stored, meta, progress,
                                                              report), True
    cfg, weights = load_gguf(path, progress=progress, report=report)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    mark(report, "write", 0, 1, "files")
    stored, stacks = stack(weights)
    save_aligned(stored, str(tmp), metadata={
        "config": cfg.to_json(), "source": os.path.realpath(path), "order": json.dumps(
            list(weights)), "stacks": json.dumps(stacks)})
    os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    log.info("weights_cached", path=path, cache=str(target))
    mark(report, "write", 1, 1, "files")
    return cfg, weights, False


def stack(weights: dict[str, torch.Tensor]
          ) -> tuple[dict[str, torch.Tensor], dict[str, list[tuple[str, int]]]]:
    """(what to store, stack name -> [(projection, rows)]): each layer's STACKS whose parts are
    all there as 2-D tensors of one dtype and width go in as one tensor."""
    stored = {k: v.contiguous() for k, v in weights.items()}
    stacks: dict[str, list[tuple[str, int]]] = {}
    layers = {k[:k.index(".self_attn.") + 1] for k in weights if ".self_attn." in k}
    for prefix in sorted(layers):
        for name, parts in STACKS.items():
            ts = [weights.get(prefix + p) for p in parts]
            if any(t is None or t.dim() != 2 for t in ts) or \
                    len({(t.dtype, t.shape[1]) for t in ts}) != 1:
                continue
            stored[prefix + name] = torch.cat([stored.pop(prefix + p) for p in parts])
            stacks[prefix + name] = [(prefix + p, t.shape[0]) for p, t in zip(parts, ts,
                                                                             strict=True)]
    return stored, stacks


def unstack(stored: dict[str, torch.Tensor], meta: dict[str, str], progress: bool,
            report: Report | None) -> dict[str, torch.Tensor]:
    """The weights under their own names, in the order they were converted: row views of the
    stacks, the rest as stored. One "read" report per weight."""
    views = dict(stored)
    for name, parts in json.loads(meta.get("stacks", "{}")).items():
        rows = views.pop(name).split([n for _, n in parts])
        views.update({p: r for (p, _), r in zip(parts, rows, strict=True)})
    order = json.loads(meta.get("order", "[]")) or sorted(views)
    return {k: views[k].float() for k in tracked(order, "read", "tensors", progress, report)}


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
