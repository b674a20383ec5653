"""Quantization recipes: which format, whether to smooth, which layers stay fp32, how wide the
KV pool is.

Names are what `llmsh deploy --quant NAME` takes. The perplexity ratios and speeds behind the
choice of default are measured by bench/perplexity.py (README carries the table)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("qkv", "o", "gate_up", "down", "lm_head")  # the linear weights a recipe may quantize


@dataclass(frozen=True)
class Recipe:
    name: str
    fmt: str = "int8"                  # "none": everything stays fp32
    smooth_alpha: float = 0.0          # SmoothQuant migration strength; 0 = no smoothing
    fp32_kinds: tuple[str, ...] = ()   # kinds kept in fp32 in every layer
    fp32_edge_layers: int = 0          # this many first and last layers stay fp32
    lm_head: bool = True               # quantize the LM head too
    embed: bool = True                 # int8 embedding table (per-row scale; lookups only)
    half_kv: bool = False              # the CPU's KV pool in fp16: decode reads half the bytes

    @property
    def quantized(self) -> bool:
        return self.fmt != "none"

    def kv_dtype(self, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The KV pool's dtype: fp16 for an fp32 model on the CPU when the recipe halves the
        pool (drivers/cpu/paged_decode.c widens on load), else the model's."""
        if self.half_kv and device.type == "cpu" and model_dtype == torch.float32:
            return torch.float16
        return model_dtype

    def keeps_fp32(self, kind: str, layer: int, num_layers: int) -> bool:
        if kind == "lm_head":
            return not self.lm_head
        edge = layer < self.fp32_edge_layers or layer >= num_layers - self.fp32_edge_layers
        return kind in self.fp32_kinds or edge


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("none", fmt="none"),
    Recipe("int8-plain", half_kv=True),                            # per-row int8, no smoothing
    Recipe("int8-smooth", smooth_alpha=0.5, half_kv=True),         # SmoothQuant alpha 0.5
    Recipe("int8-smooth-kv32", smooth_alpha=0.5),                  # ... with an fp32 KV pool
    Recipe("int8-smooth-qkv32", smooth_alpha=0.5, fp32_kinds=("qkv",), half_kv=True),
    Recipe("int8-smooth-edge2", smooth_alpha=0.5, fp32_edge_layers=2, half_kv=True),
    Recipe("int8-smooth-qkv32-edge2", smooth_alpha=0.5, fp32_kinds=("qkv",), fp32_edge_layers=2,
           half_kv=True),
    Recipe("int4", fmt="int4"), Recipe("q8_0", fmt="q8_0"), Recipe("q4_1", fmt="q4_1"),
)}
ALIASES = {"": "none", "fp32": "none", "int8": "int8-smooth"}  # int8: the CPU default mix
CPU_RECIPES = tuple(n for n, r in RECIPES.items() if r.fmt in ("none", "int8"))


def recipe(name: str) -> Recipe:
    key = ALIASES.get(name, name)
    if key not in RECIPES:
        raise ValueError(f"quant {name!r} is not one of {sorted(set(RECIPES) | set(ALIASES))}")
    return RECIPES[key]
