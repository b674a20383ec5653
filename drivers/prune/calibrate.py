"""One calibration pass over a short text, read through hooks on the model's own forward.

Two statistics: each layer's block influence (ShortGPT: 1 - cos(h_in, h_out) of the residual
stream, averaged over tokens) and, per linear weight, the sum over tokens of x_j^2 for each
input channel j (Wanda's |X_j|, and the activation side of the structured importances). The
hooks are instance attributes that shadow LlamaModel.linear, .rms_norm and .add_norm (the
residual add fused with the norm after it) for the pass only, as drivers/quant/apply.py's
activation_amax does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import SMALL_ROWS, LlamaModel

KINDS = ("qkv", "o", "gate_up", "down")  # the fused weights of a Layer, by their input
CHUNK = SMALL_ROWS   # tokens per step: at this many rows gate_up goes through linear()
WINDOW = 512         # tokens per sequence: each window starts with an empty cache
BLOCK = 16


@dataclass
class Stats:
    influence: list[float]                   # per layer: mean over tokens of 1 - cos(in, out)
    sq: dict[tuple[int, str], torch.Tensor]  # (layer, kind) -> sum over tokens of x^2, [in]
    tokens: int

    def input_norm(self, layer: int, kind: str) -> torch.Tensor:
        """|X_j|: the L2 norm over the calibration tokens of input channel j."""
        return self.sq[(layer, kind)].sqrt()


def window_pool(model: LlamaModel) -> KVPool:
    cfg = model.cfg
    blocks = WINDOW // BLOCK + 1
    per_block = cfg.num_layers * 2 * BLOCK * cfg.num_kv_heads * cfg.head_dim * 4
    return KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, blocks * per_block, BLOCK,
                  model.dtype, model.device)


@torch.inference_mode()
def collect(model: LlamaModel, ids: list[int], progress: bool = True) -> Stats:
    """Run ids through the model WINDOW tokens at a time, CHUNK tokens per step."""
    layers = len(model.layers)
    weights = {id(getattr(layer, k)): (i, k) for i, layer in enumerate(model.layers)
               for k in KINDS}
    norms = {id(layer.attn_norm): i for i, layer in enumerate(model.layers)}
    norms[id(model.norm)] = layers   # the final norm reads the last layer's output
    sq: dict[tuple[int, str], torch.Tensor] = {}
    hidden: dict[int, torch.Tensor] = {}
    plain_linear, plain_norm, plain_add_norm = model.linear, model.rms_norm, model.add_norm

    def linear(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        key = weights.get(id(w))
        if key is not None:
            s = x.float().square().sum(0)
            sq[key] = s if key not in sq else sq[key] + s
        return plain_linear(x, w, bias)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
        if id(weight) in norms:   # a copy: the forward adds to its residual stream in place
            hidden[norms[id(weight)]] = x.to(torch.float32, copy=True)
        return plain_norm(x, weight, bias)

    def add_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        out = plain_add_norm(x, delta, weight, bias)   # x is the stream with delta added
        if id(weight) in norms:
            hidden[norms[id(weight)]] = x.to(torch.float32, copy=True)
        return out

    cos = torch.zeros(layers, dtype=torch.float64)
    pool = window_pool(model)
    table = list(range(pool.geometry.num_blocks))
    gqa = model.cfg.num_heads // model.cfg.num_kv_heads
    steps = [(w, s) for w in range(0, len(ids), WINDOW)
             for s in range(w, min(w + WINDOW, len(ids)), CHUNK)]
    model.linear, model.rms_norm, model.add_norm = linear, rms_norm, add_norm
    try:
        for window, start in tqdm(steps, desc="calibrate", unit="step", disable=not progress):
            chunk = ids[start:min(start + CHUNK, window + WINDOW)]
            batch = build_batch([SeqSlice(chunk, start - window, table, True)], BLOCK, gqa,
                                model.device, for_kernels=model.kernels is not None)
            batch.sample_rows = torch.arange(len(chunk), device=model.device)
            model.forward(batch, pool)
            for i in range(layers):
                cos[i] += F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).double().sum()
    finally:
        del model.linear, model.rms_norm, model.add_norm
    return Stats([1.0 - float(c) / len(ids) for c in cos], sq, len(ids))
