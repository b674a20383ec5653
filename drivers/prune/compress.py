"""compress: load a model, calibrate, prune by one method, write the pruned folder.

Works offline on the files (no daemon). A GGUF source is dequantized to fp32 (through the
weights cache of the state dir, as Deploy does); the families whose checkpoints use Llama's
tensor names are supported (Llama, Mistral, SmolLM, Qwen2, Qwen3)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmasos.drivers.loaders.cache import load_weights, weights_cache_dir
from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.loaders.probe import probe
from llmasos.drivers.model.families import family_name
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.prune.calibrate import Stats, collect
from llmasos.drivers.prune.layers import layers_removed, prune_layers
from llmasos.drivers.prune.methods import DEFAULT_CALIB_TOKENS, request
from llmasos.drivers.prune.shape import Pruned
from llmasos.drivers.prune.structured import heads_kept, mlp_kept, prune_heads, prune_mlp
from llmasos.drivers.prune.unstructured import prune_weights
from llmasos.drivers.prune.write import check_out, write_folder
from llmasos.drivers.quant.corpus import calibration_prose
from llmasos.drivers.tokenizer import Tokenizer

FAMILIES = ("llama", "mistral", "smollm", "qwen2", "qwen3")  # checkpoints in Llama's names
Pruner = Callable[[ModelConfig, dict[str, torch.Tensor], Stats | None, float], Pruned]
PRUNERS: dict[str, Pruner] = {
    "layers": prune_layers,
    "mlp": prune_mlp,
    "heads": prune_heads,
    "magnitude": lambda cfg, w, stats, r: prune_weights(w, stats, "magnitude", r),
    "wanda": lambda cfg, w, stats, r: prune_weights(w, stats, "wanda", r),
    "2:4": lambda cfg, w, stats, r: prune_weights(w, stats, "2:4", r),
}

# the structured cuts checked against the config before the calibration pass is paid for
CHECKS: dict[str, Callable[[ModelConfig, float], object]] = {
    "layers": layers_removed, "mlp": mlp_kept, "heads": heads_kept}


@dataclass
class Report:
    out: str
    method: str
    ratio: float
    layers: tuple[int, int]         # before, after
    parameters: tuple[int, int]     # before, after
    calib_tokens: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


def load_source(source: str, cache_dir: str, progress: bool
                ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, fp32 weights in HF names, tokenizer); FileNotFoundError or ValueError."""
    cfg, tokenizer = probe(source)
    if family_name(cfg.architecture) not in FAMILIES:
        raise ValueError(f"pruning supports {', '.join(FAMILIES)}, not {cfg.architecture!r}")
    cfg, weights, _ = load_weights(source, cache_dir, progress=progress)
    return cfg, weights, tokenizer


def calibration_ids(tokenizer: Tokenizer, tokens: int) -> list[int]:
    return tokenizer.encode(calibration_prose())[:tokens]


def parameters(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in weights.values())


def compress(source: str, out: str, method: str, ratio: float | None,
             calib_tokens: int = DEFAULT_CALIB_TOKENS, cache_dir: str | None = None,
             progress: bool = True) -> Report:
    """Prune source into the new folder out; ValueError / FileNotFoundError / FileExistsError
    name what is wrong before any work is done."""
    t0 = time.perf_counter()
    req = request(method, ratio, calib_tokens)
    check_out(out)
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such model file or folder: {source}")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(f"loading {source}")
    cfg, weights, tokenizer = load_source(source, cache_dir or weights_cache_dir(), progress)
    CHECKS.get(req.method.name, lambda c, r: None)(cfg, req.ratio)
    stats = None
    ids: list[int] = []
    if req.method.calibrated:
        ids = calibration_ids(tokenizer, req.calib_tokens)
        say(f"calibrating on {len(ids)} tokens")
        stats = collect(LlamaModel(cfg, weights), ids, progress)
    say(f"pruning: {req.method.what}")
    pruned = PRUNERS[req.method.name](cfg, weights, stats, req.ratio)
    record = {"method": req.method.name, "ratio": req.ratio, "calib_tokens": len(ids),
              "source": os.path.abspath(source)}
    say(f"writing {out}")
    config = write_folder(out, source, cfg, tokenizer, pruned, record)
    return Report(out, req.method.name, req.ratio,
                  (cfg.num_layers, int(config["num_hidden_layers"])),
                  (parameters(weights), parameters(pruned.weights)), len(ids),
                  time.perf_counter() - t0, config)
