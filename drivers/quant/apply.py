"""Post-load pass: replace a loaded model's linear weights by packed quantized ones.

Walks model.layers[i].{qkv, o, gate_up, down} and model.lm_head; the model calls
w.matmul(x, bias) for any weight that is not a plain tensor; the embedding table becomes an
Int8Embedding, which F.embedding reads through __torch_function__."""

from __future__ import annotations

from typing import Any

import torch

from llmasos.drivers.loaders.progress import Report, tracked
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.quant.cpu_int8 import CpuInt8
from llmasos.drivers.quant.embedding import Int8Embedding
from llmasos.drivers.quant.interface import QuantDriver
from llmasos.drivers.quant.recipe import Recipe
from llmasos.drivers.quant.triton import TritonQuant

LAYER_KINDS = ("qkv", "o", "gate_up", "down")
CALIB_CHUNK = 64  # tokens per calibration step: the model's small-row path calls linear()
BLOCK = 16


def driver_for(model: Any) -> QuantDriver:
    return TritonQuant(model.device) if model.kernels is not None else CpuInt8()


def targets(model: Any, recipe: Recipe) -> list[tuple[Any, str]]:
    """(owner, attribute) of every fp32 weight the recipe quantizes."""
    n = len(model.layers)
    out = [(layer, kind) for i, layer in enumerate(model.layers) for kind in LAYER_KINDS
           if not recipe.keeps_fp32(kind, i, n)]
    if not recipe.keeps_fp32("lm_head", n - 1, n):
        out.append((model, "lm_head"))
    return [(o, a) for o, a in out if isinstance(getattr(o, a), torch.Tensor)]


@torch.inference_mode()
def activation_amax(model: Any, ids: list[int],
                    report: Report | None = None) -> dict[int, torch.Tensor]:
    """Per input channel max |x| seen by each linear weight (keyed by id(weight)) while the
    model reads ids, CALIB_CHUNK tokens at a time."""
    stats: dict[int, torch.Tensor] = {}
    plain = model.linear

    def record(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        amax = x.detach().abs().float().amax(dim=0)
        key = id(w)
        stats[key] = amax if key not in stats else torch.maximum(stats[key], amax)
        return plain(x, w, bias)

    cfg = model.cfg
    blocks = len(ids) // BLOCK + 2
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                  blocks * BLOCK * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4 * 2,
                  BLOCK, model.dtype, model.device)
    table = list(range(blocks))
    model.linear = record  # an instance attribute shadows the method for this pass only
    try:
        for start in tracked(range(0, len(ids), CALIB_CHUNK), "calibrate", "chunks",
                             report=report):
            chunk = SeqSlice(ids[start:start + CALIB_CHUNK], start, table, True)
            batch = build_batch([chunk], BLOCK, cfg.num_heads // cfg.num_kv_heads,
                                model.device, for_kernels=model.kernels is not None)
            model.forward(batch, pool)
    finally:
        del model.linear
    return stats


def smooth_factor(x_amax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|x_j|^a / max|W_:j|^(1-a), moving outliers from x into W."""
    w_amax = w.abs().amax(dim=0).float().clamp(min=1e-5)
    s = x_amax.float().clamp(min=1e-5).pow(alpha) / w_amax.pow(1 - alpha)
    return s.clamp(min=1e-5).to(w.device)


def quantize_model(model: Any, recipe: Recipe, calib_ids: list[int] | None = None,
                   report: Report | None = None) -> int:
    """Quantize model's linear weights in place per the recipe; returns how many were packed.
    Smoothing needs calib_ids (a text disjoint from whatever the model is evaluated on);
    `report` hears each weight packed."""
    if not recipe.quantized:
        return 0
    if recipe.smooth_alpha and not calib_ids:
        raise ValueError(f"recipe {recipe.name!r} smooths: it needs calibration tokens")
    driver = driver_for(model)
    todo = targets(model, recipe)
    amax = activation_amax(model, calib_ids, report) if recipe.smooth_alpha else {}
    for owner, attr in tracked(todo, "quantize", "weights", report=report):
        w = getattr(owner, attr)
        s = smooth_factor(amax[id(w)], w, recipe.smooth_alpha) if id(w) in amax else None
        setattr(owner, attr, driver.quantize(w, recipe.fmt, s))
    if recipe.embed and isinstance(model.embed, torch.Tensor):
        model.embed = Int8Embedding.quantize(model.embed)
    narrow_kv(model, recipe)
    if hasattr(model, "weights_changed"):   # the native layer call points at the old ones
        model.weights_changed()
    return len(todo)


def narrow_kv(model: Any, recipe: Recipe) -> None:
    """The KV pool's dtype as the recipe has it, where the CPU's attention reads it (the Triton
    kernels read the model's dtype)."""
    if model.kernels is None:
        model.kv_dtype = recipe.kv_dtype(model.dtype, model.device)
