"""Deploy-time quantization: which recipes a device serves, and applying one after load.

The calibration slice (pydoc_data prose, disjoint from bench/perplexity.py's evaluation slice)
feeds the smoothing statistics of recipes that smooth."""

from __future__ import annotations

import structlog
import torch

from llmasos.drivers.loaders.progress import Report
from llmasos.drivers.quant.apply import quantize_model
from llmasos.drivers.quant.corpus import calibration_text
from llmasos.drivers.quant.recipe import RECIPES, Recipe, recipe
from llmasos.drivers.tokenizer import Tokenizer

log = structlog.get_logger()

CALIB_TOKENS = 512  # enough for stable per-channel maxima; ~1 s of fp32 prefill on the CPU
# Formats each device's driver serves (drivers/quant/cpu_int8.py, drivers/quant/triton.py).
DEVICE_FORMATS = {"cpu": ("none", "int8"), "cuda": ("none", "int8", "int4", "q8_0", "q4_1")}


def formats(device: torch.device) -> list[str]:
    """Recipe names a model on this device may be deployed with ('int8' = the default mix)."""
    served = DEVICE_FORMATS.get(device.type, ("none",))
    names = [n for n, r in RECIPES.items() if r.fmt in served]
    return (["int8"] if "int8" in served else []) + names


def resolve(name: str, device: torch.device) -> Recipe:
    """The recipe for a deploy request; ValueError naming the choices if the device lacks it."""
    r = recipe(name)
    if r.fmt not in DEVICE_FORMATS.get(device.type, ("none",)):
        raise ValueError(f"quant {name!r} is not served on {device.type}; choose one of "
                         f"{formats(device)} (llmsh models --formats)")
    return r


def apply(model: object, r: Recipe, tokenizer: Tokenizer, report: Report | None = None) -> int:
    """Quantize a freshly loaded model in place; returns how many weights were packed."""
    if not r.quantized:
        return 0
    calib = tokenizer.encode(calibration_text())[:CALIB_TOKENS] if r.smooth_alpha else None
    packed = quantize_model(model, r, calib, report)
    log.info("model_quantized", recipe=r.name, packed=packed)
    return packed
