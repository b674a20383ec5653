"""Whole-layer pruning by block influence (ShortGPT, Men et al. 2024): a layer whose output
is nearly its input (1 - cos(h_in, h_out) small over the calibration tokens) is dropped, and
the layers after it are renumbered. One shot: the influences of the full model rank them."""

from __future__ import annotations

import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.prune.calibrate import Stats
from llmasos.drivers.prune.methods import removed
from llmasos.drivers.prune.shape import Pruned, layer_of


def least_influential(influence: list[float], count: int) -> list[int]:
    """The `count` layers of least block influence, in layer order."""
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    return sorted(order[:count])


def drop_layers(weights: dict[str, torch.Tensor], drop: set[int]) -> dict[str, torch.Tensor]:
    """The checkpoint without the dropped layers, the others renumbered 0, 1, ... in order."""
    kept = sorted({at[0] for name in weights if (at := layer_of(name))} - drop)
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, t in weights.items():
        at = layer_of(name)
        if at is None:
            out[name] = t
        elif at[0] in new_index:
            out[f"model.layers.{new_index[at[0]]}.{at[1]}"] = t
    return out


def layers_removed(cfg: ModelConfig, ratio: float) -> int:
    count = removed(cfg.num_layers, ratio)
    if not 1 <= count < cfg.num_layers:
        raise ValueError(f"ratio {ratio:g} of {cfg.num_layers} layers removes {count}: "
                         f"give a ratio that removes 1..{cfg.num_layers - 1} layers")
    return count


def prune_layers(cfg: ModelConfig, weights: dict[str, torch.Tensor], stats: Stats,
                 ratio: float) -> Pruned:
    count = layers_removed(cfg, ratio)
    drop = least_influential(stats.influence, count)
    return Pruned(drop_layers(weights, set(drop)),
                  {"num_hidden_layers": cfg.num_layers - count},
                  {"dropped_layers": drop,
                   "block_influence": [round(b, 5) for b in stats.influence]})
