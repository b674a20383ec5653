"""Deploy-time quantization: which recipes a device serves, its default, and applying one after
load (or restoring it from the int8 cache, drivers/quant/cache.py).

The calibration slice (pydoc_data prose, disjoint from bench/perplexity.py's evaluation slice)
feeds the smoothing statistics of recipes that smooth."""

from __future__ import annotations

import os
from pathlib import Path

import structlog
import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.loaders.progress import Report
from llmasos.drivers.quant import cache
from llmasos.drivers.quant.apply import driver_for, narrow_kv, quantize_model
from llmasos.drivers.quant.corpus import calibration_text
from llmasos.drivers.quant.recipe import RECIPES, Recipe, recipe
from llmasos.drivers.tokenizer import Tokenizer

log = structlog.get_logger()

CALIB_TOKENS = 512  # enough for stable per-channel maxima; ~1 s of fp32 prefill on the CPU
# Formats each device's driver serves (drivers/quant/cpu_int8.py, drivers/quant/triton.py).
DEVICE_FORMATS = {"cpu": ("none", "int8"), "cuda": ("none", "int8", "int4", "q8_0", "q4_1")}
# What "auto" (llmosd's default) deploys: the fastest recipe within 2% of fp32 perplexity on the
# held-out text, fp32 if none is (bench/perplexity.py and bench/engine_step.py; README table).
AUTO = {
    "cpu": "int8-smooth",  # perplexity 1.018x fp32, one-user decode 2.06x fp32, weights 0.33x
    "cuda": "none",        # no frontier measured on a GPU yet: the model stays unquantized
}


def formats(device: torch.device) -> list[str]:
    """Recipe names a model on this device may be deployed with ('int8' = the default mix)."""
    served = DEVICE_FORMATS.get(device.type, ("none",))
    names = [n for n, r in RECIPES.items() if r.fmt in served]
    return (["int8"] if "int8" in served else []) + names


def resolve(name: str, device: torch.device) -> Recipe:
    """The recipe for a deploy request ("auto": the device's default, AUTO); ValueError naming
    the choices if the device lacks it."""
    r = recipe(AUTO.get(device.type, "none") if name == "auto" else name)
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


def cache_file(path: str, r: Recipe, device: torch.device, cache_dir: str) -> Path | None:
    """Where the int8 cache keeps this model quantized by r; None where there is none (an
    unquantized recipe, a device other than the CPU, a source that is not one file)."""
    if not r.quantized or device.type != "cpu" or not os.path.isfile(path):
        return None
    return cache.cache_file(path, r, f"{CALIB_TOKENS}|{calibration_text()}", cache_dir)


def cached(file: Path | None) -> cache.Cached | None:
    """The int8 cache entry, or None on a miss (or a damaged entry, which is rewritten)."""
    if file is None or not file.is_file():
        return None
    try:
        return cache.load(file)
    except Exception as err:  # noqa: BLE001 - a damaged entry costs a requantization, no more
        log.warning("int8_cache_unreadable", cache=str(file), error=str(err)[:200])
        return None


def restore(model: object, hit: cache.Cached, r: Recipe) -> int:
    driver_for(model)   # the quantized engine's probe, as a fresh quantization runs it
    packed = cache.restore(model, hit)
    narrow_kv(model, r)
    log.info("model_quantized", recipe=r.name, packed=packed, cached=True)
    return packed


def save(file: Path | None, model: object, cfg: ModelConfig, checkpoint: dict,
         source: str) -> None:
    """Keep the freshly quantized model in the int8 cache; a failure only costs the next boot."""
    if file is None:
        return
    try:
        cache.save(file, model, cfg, checkpoint, source)
    except OSError as err:
        log.warning("int8_cache_not_written", cache=str(file), error=str(err)[:200])
