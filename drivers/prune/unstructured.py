"""Unstructured pruning: zeros in the layers' linear weights, shapes unchanged.

magnitude: the smallest |W| of each weight matrix. wanda (Sun et al. 2023): the lowest
|W_ij| * |X_j| in each output row, |X_j| the input channel's norm over the calibration tokens.
2:4: in every group of 4 consecutive inputs of a row, the 2 of lowest |W_ij| * |X_j| (the
pattern NVIDIA's sparse tensor cores run at twice the dense rate). The embedding table and the
LM head stay dense, as in the papers."""

from __future__ import annotations

import torch

from llmasos.drivers.prune.calibrate import Stats
from llmasos.drivers.prune.shape import Pruned, layer_of

# the layers' linear weights, by the calibration statistic of their input (calibrate.KINDS)
LINEARS: dict[str, str] = {
    "self_attn.q_proj.weight": "qkv", "self_attn.k_proj.weight": "qkv",
    "self_attn.v_proj.weight": "qkv", "self_attn.o_proj.weight": "o",
    "mlp.gate_proj.weight": "gate_up", "mlp.up_proj.weight": "gate_up",
    "mlp.down_proj.weight": "down",
}  # fmt: skip


def linears(weights: dict[str, torch.Tensor]) -> list[tuple[str, int, str]]:
    """(name, layer, input statistic) of every linear weight the methods prune."""
    out = []
    for name in weights:
        at = layer_of(name)
        if at is not None and at[1] in LINEARS:
            out.append((name, at[0], LINEARS[at[1]]))
    return out


def magnitude_mask(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """True = keep; exactly round(ratio * numel) of the smallest |W| are dropped (kthvalue,
    3x faster than topk for half a matrix; ties at the threshold dropped in index order)."""
    k = round(ratio * w.numel())
    a = w.abs().flatten()
    threshold = a.kthvalue(k).values
    drop = a < threshold
    ties = (a == threshold).nonzero().flatten()
    drop[ties[: k - int(drop.sum())]] = True
    return ~drop.view(w.shape)


def wanda_mask(w: torch.Tensor, x_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """True = keep; per output row, exactly round(ratio * in) of the lowest |W| |X| dropped."""
    score = w.abs().float() * x_norm[None]
    k = round(ratio * w.shape[1])
    keep = torch.ones_like(w, dtype=torch.bool)
    return keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)


def two_four_mask(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """True = keep; 2 of every 4 consecutive inputs of each row, by |W| |X|."""
    rows, cols = w.shape
    if cols % 4:
        raise ValueError(f"2:4 needs input sizes divisible by 4, not {cols}")
    score = (w.abs().float() * x_norm[None]).view(rows, cols // 4, 4)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(2, score.topk(2, dim=2, largest=False).indices, False)
    return keep.view(rows, cols)


def is_two_four(w: torch.Tensor) -> bool:
    """Does every group of 4 consecutive inputs of each row hold at most 2 non-zeros?"""
    rows, cols = w.shape
    return cols % 4 == 0 and bool(((w.view(rows, cols // 4, 4) != 0).sum(dim=2) <= 2).all())


def prune_weights(weights: dict[str, torch.Tensor], stats: Stats | None, method: str,
                  ratio: float) -> Pruned:
    out = dict(weights)
    for name, layer, kind in linears(weights):
        w = weights[name]
        if method == "magnitude":
            keep = magnitude_mask(w, ratio)
        elif method == "wanda":
            keep = wanda_mask(w, stats.input_norm(layer, kind), ratio)
        else:
            keep = two_four_mask(w, stats.input_norm(layer, kind))
        out[name] = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    zeros = sum(int((out[n] == 0).sum()) for n, _, _ in linears(out))
    total = sum(out[n].numel() for n, _, _ in linears(out))
    return Pruned(out, {}, {"linear_zeros": round(zeros / total, 6)})
