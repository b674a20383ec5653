"""Structured pruning inside each layer: MLP intermediate channels and attention heads, ranked
by activation-aware importance from the calibration pass. The same count goes in every layer,
because the model (and a plain HF config) has one intermediate_size and one head count.

MLP channel j: |a_j| * |W_down[:, j]| (a_j the down projection's input over the calibration
tokens): the size of what the channel adds to the residual stream. Its gate and up rows and its
down column go together.
Query head h: sqrt(sum_c |X_c|^2 |W_o[:, c]|^2) over the head's columns c of o_proj: the energy
it writes through o_proj. A KV group's importance is the sum of its query heads'. Grouped-query
attention stays consistent: every KV group keeps the same number of query heads (query head h
reads KV head h // group), so a cut is a number of KV groups kept times query heads per group."""

from __future__ import annotations

import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.prune.calibrate import Stats
from llmasos.drivers.prune.methods import removed
from llmasos.drivers.prune.shape import Pruned


def top_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the layout's order)."""
    return score.topk(k).indices.sort().values


def keep_rows(weights: dict[str, torch.Tensor], name: str, idx: torch.Tensor) -> None:
    """Keep rows idx of `name` (a weight or bias), if the checkpoint has it."""
    if name in weights:
        weights[name] = weights[name].index_select(0, idx).contiguous()


def keep_columns(weights: dict[str, torch.Tensor], name: str, idx: torch.Tensor) -> None:
    weights[name] = weights[name].index_select(1, idx).contiguous()


def mlp_kept(cfg: ModelConfig, ratio: float) -> int:
    size = cfg.intermediate_size
    keep = size - removed(size, ratio)
    if not 1 <= keep < size:
        raise ValueError(f"ratio {ratio:g} of {size} MLP channels keeps {keep}")
    return keep


def prune_mlp(cfg: ModelConfig, weights: dict[str, torch.Tensor], stats: Stats,
              ratio: float) -> Pruned:
    size = cfg.intermediate_size
    keep = mlp_kept(cfg, ratio)
    out = dict(weights)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp."
        down = out[p + "down_proj.weight"]
        score = stats.input_norm(i, "down") * down.float().norm(dim=0)
        idx = top_sorted(score, keep)
        for proj in ("gate_proj", "up_proj"):
            keep_rows(out, p + f"{proj}.weight", idx)
            keep_rows(out, p + f"{proj}.bias", idx)
        keep_columns(out, p + "down_proj.weight", idx)
    return Pruned(out, {"intermediate_size": keep}, {"mlp_channels": [size, keep]})


def head_shape(kv_heads: int, group: int, target: int) -> tuple[int, int]:
    """(KV groups kept, query heads per group) with a head count nearest `target`, never the
    full shape; ties keep more KV groups (the cut then falls on query heads first)."""
    shapes = [(k, g) for k in range(1, kv_heads + 1) for g in range(1, group + 1)
              if (k, g) != (kv_heads, group)]
    return min(shapes, key=lambda s: (abs(s[0] * s[1] - target), -s[0]))


def head_scores(o_proj: torch.Tensor, x_norm: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads]: sqrt(sum over the head's columns c of |X_c|^2 |W_o[:, c]|^2)."""
    energy = x_norm.square() * o_proj.float().square().sum(dim=0)
    return energy.view(heads, -1).sum(dim=1).sqrt()


def kept_heads(score: torch.Tensor, kv_heads: int, keep_kv: int, keep_q: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept KV heads, kept query heads), both in index order; score is per query head."""
    per_group = score.view(kv_heads, -1)
    groups = top_sorted(per_group.sum(dim=1), keep_kv)
    group = per_group.shape[1]
    queries = [g * group + top_sorted(per_group[g], keep_q) for g in groups.tolist()]
    return groups, torch.cat(queries)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows (or columns) of a projection that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def heads_kept(cfg: ModelConfig, ratio: float) -> tuple[int, int]:
    """(KV groups kept, query heads kept per group) for a ratio of the query heads."""
    if removed(cfg.num_heads, ratio) == 0:
        raise ValueError(f"ratio {ratio:g} of {cfg.num_heads} heads removes none")
    target = cfg.num_heads - removed(cfg.num_heads, ratio)
    return head_shape(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, target)


def prune_heads(cfg: ModelConfig, weights: dict[str, torch.Tensor], stats: Stats,
                ratio: float) -> Pruned:
    keep_kv, keep_q = heads_kept(cfg, ratio)
    d = cfg.head_dim
    out = dict(weights)
    for i in range(cfg.num_layers):
        a = f"model.layers.{i}.self_attn."
        score = head_scores(out[a + "o_proj.weight"], stats.input_norm(i, "o"), cfg.num_heads)
        kv, q = kept_heads(score, cfg.num_kv_heads, keep_kv, keep_q)
        for kind in ("weight", "bias"):
            keep_rows(out, a + f"q_proj.{kind}", head_rows(q, d))
            keep_rows(out, a + f"k_proj.{kind}", head_rows(kv, d))
            keep_rows(out, a + f"v_proj.{kind}", head_rows(kv, d))
        keep_columns(out, a + "o_proj.weight", head_rows(q, d))
    heads = keep_kv * keep_q
    return Pruned(out, {"num_attention_heads": heads, "num_key_value_heads": keep_kv,
                        "head_dim": d},
                  {"heads": [cfg.num_heads, heads], "kv_heads": [cfg.num_kv_heads, keep_kv]})
