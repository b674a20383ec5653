"""The int8 cache: a model as its CPU int8 recipe left it, so a restart skips dequantizing the
GGUF file, the smoothing calibration and the quantization (seconds) and only repacks.

One safetensors file per (source file, recipe) under <weights cache>/int8/, keyed like the fp32
cache by the source's path, size and mtime, plus the recipe and the calibration text. It holds
int8 weights and their scales, the small fp32 tensors (norms, biases) and only those large fp32
weights the recipe keeps in fp32: never an fp32 copy of a quantized weight. The model object is
rebuilt by the ordinary constructor from uninitialized stand-ins of the checkpoint's shapes
(recorded here; no time spent filling them), then every weight is set from the file."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.quant.cpu_int8 import Int8Linear, pack_quantized, unpack
from llmasos.drivers.quant.cpu_native import NativeInt8Linear
from llmasos.drivers.quant.embedding import Int8Embedding
from llmasos.drivers.quant.recipe import Recipe

log = structlog.get_logger()
CACHE_VERSION = "1"   # bump when the stored layout changes
SMALL = 1 << 16       # checkpoint tensors up to this many elements are stored as they are
MODEL_ATTRS = ("embed", "embed_positions", "norm", "norm_bias", "lm_head", "lm_head_bias")
LAYER_ATTRS = ("attn_norm", "qkv", "qkv_bias", "o", "mlp_norm", "gate_up", "down",
               "attn_norm_bias", "mlp_norm_bias", "o_bias", "gate_up_bias", "down_bias",
               "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


def cache_file(source: str, recipe: Recipe, calibration: str, cache_dir: str) -> Path:
    real = os.path.realpath(source)   # one file under two names (a symlink) quantizes once
    st = os.stat(real)
    key = (f"{CACHE_VERSION}|{real}|{st.st_size}|{st.st_mtime_ns}|"
           f"{recipe}|{hashlib.sha256(calibration.encode()).hexdigest()}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir) / "int8" / f"{Path(real).stem}-{recipe.name}-{digest}.safetensors"


def _slots(model: Any) -> list[tuple[str, Any, str]]:
    """(path, owner, attribute) of every weight slot the model has filled."""
    out = [(a, model, a) for a in MODEL_ATTRS]
    out += [(f"layers.{i}.{a}", layer, a) for i, layer in enumerate(model.layers)
            for a in LAYER_ATTRS]
    return [(p, o, a) for p, o, a in out if getattr(o, a, None) is not None]


def save(file: Path, model: Any, cfg: ModelConfig, checkpoint: dict[str, torch.Tensor],
         source: str) -> None:
    """Write the quantized model; atomic (a crash never leaves half a file)."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, str] = {}
    for path, owner, attr in _slots(model):
        w = getattr(owner, attr)
        if isinstance(w, (Int8Linear, NativeInt8Linear)):
            layout[path] = "int8"
            tensors[f"{path}.q"], tensors[f"{path}.scale"] = unpack(w)
            if w.inv_smooth is not None:
                tensors[f"{path}.inv_smooth"] = w.inv_smooth
        elif isinstance(w, Int8Embedding):
            layout[path] = "embed"
            tensors[f"{path}.q"], tensors[f"{path}.scale"] = w.q, w.scale
        elif attr == "lm_head" and w is model.embed:
            layout[path] = "tied"
        else:
            layout[path] = "tensor"
            tensors[path] = w
    shapes = {n: list(t.shape) for n, t in checkpoint.items()}
    for n, t in checkpoint.items():
        if t.numel() <= SMALL:
            tensors[f"checkpoint.{n}"] = t.clone()  # small; a slot may hold the same one
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    st = os.stat(source)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={
        "config": cfg.to_json(), "source": os.path.realpath(source), "version": CACHE_VERSION,
        "source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns),
        "layout": json.dumps(layout), "shapes": json.dumps(shapes)})
    os.replace(tmp, file)
    log.info("int8_cached", source=source, cache=str(file), bytes=file.stat().st_size)


@dataclass
class Cached:
    cfg: ModelConfig
    layout: dict[str, str]
    shapes: dict[str, list[int]]
    tensors: dict[str, torch.Tensor]

    def standins(self) -> dict[str, torch.Tensor]:
        """The checkpoint for the model's constructor: small tensors as stored, large ones
        uninitialized, of their shape (every weight is then set by restore)."""
        stored = {n.removeprefix("checkpoint."): t for n, t in self.tensors.items()
                  if n.startswith("checkpoint.")}
        return {n: stored[n] if n in stored else torch.empty(shape)
                for n, shape in self.shapes.items()}


def load(file: Path) -> Cached:
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    return Cached(ModelConfig.from_json(meta["config"]), json.loads(meta["layout"]),
                  json.loads(meta["shapes"]), tensors)


def restore(model: Any, cached: Cached) -> int:
    """Set every weight slot from the cache; returns how many int8 weights were packed."""
    slots = {path: (owner, attr) for path, owner, attr in _slots(model)}
    if set(slots) != set(cached.layout):
        raise ValueError("the int8 cache does not fit this model's weights")
    t = cached.tensors
    packed = 0
    for path, kind in cached.layout.items():
        owner, attr = slots[path]
        if kind == "int8":
            value: Any = pack_quantized(t[f"{path}.q"], t[f"{path}.scale"],
                                        t.get(f"{path}.inv_smooth"))
            packed += 1
        elif kind == "embed":
            value = Int8Embedding(t[f"{path}.q"], t[f"{path}.scale"])
        elif kind == "tied":
            continue
        else:
            value = t[path]
        setattr(owner, attr, value)
    if cached.layout.get("lm_head") == "tied":
        model.lm_head = model.embed
    if hasattr(model, "weights_changed"):   # the native layer call points at the old ones
        model.weights_changed()
    return packed
