"""Megatron-style tensor-parallel sharding of a Llama weight dict: rank r of N keeps its slice of
the attention heads (Q rows, K/V rows of its KV heads, O columns), of the MLP (gate/up rows,
down columns) and of the vocabulary (LM head rows); norms and the embedding table are
replicated. The unchanged LlamaModel forward over a shard computes the rank's partial sums."""

from __future__ import annotations

import dataclasses

import torch

from llmasos.drivers.cuda.quant import QuantWeight, dequantize
from llmasos.drivers.loaders.config import ModelConfig


def valid_degrees(cfg: ModelConfig) -> list[int]:
    """The tensor-parallel degrees this model splits into evenly (heads, KV heads, MLP)."""
    return [d for d in range(1, cfg.num_kv_heads + 1)
            if cfg.num_heads % d == 0 and cfg.num_kv_heads % d == 0
            and cfg.intermediate_size % d == 0]


def check_degree(cfg: ModelConfig, tp: int) -> None:
    """ValueError naming the valid degrees when tp does not divide the model."""
    if tp < 1 or tp not in valid_degrees(cfg):
        raise ValueError(
            f"tp={tp} does not split this model ({cfg.num_heads} attention heads, "
            f"{cfg.num_kv_heads} KV heads, MLP {cfg.intermediate_size}); valid tp: "
            f"{valid_degrees(cfg)}")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config one rank's LlamaModel sees: its share of heads and MLP, an untied LM head."""
    check_degree(cfg, tp)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp,
                               num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp,
                               tie_word_embeddings=False)


def vocab_shard(vocab: int, tp: int) -> int:
    """Rows of the LM head per rank (the last rank's share padded with zero rows)."""
    return -(-vocab // tp)


def _dense(t: torch.Tensor | QuantWeight) -> torch.Tensor:
    return dequantize(t) if isinstance(t, QuantWeight) else t


def _rows(t: torch.Tensor, rank: int, per: int) -> torch.Tensor:
    return t[rank * per:(rank + 1) * per].contiguous()


def _cols(t: torch.Tensor, rank: int, per: int) -> torch.Tensor:
    return t[:, rank * per:(rank + 1) * per].contiguous()


def lm_head_shard(cfg: ModelConfig, weights: dict, rank: int, tp: int) -> torch.Tensor:
    head = weights.get("lm_head.weight")
    if cfg.tie_word_embeddings or head is None:
        head = weights["model.embed_tokens.weight"]
    head = _dense(head)
    per = vocab_shard(head.shape[0], tp)
    pad = per * tp - head.shape[0]
    if pad:
        head = torch.cat([head, head.new_zeros(pad, head.shape[1])])
    return _rows(head, rank, per)


# (weight name suffix, how it splits, the unit: "q" heads, "kv" heads or MLP columns)
SPLITS: list[tuple[str, str, str]] = [
    ("self_attn.q_proj.weight", "rows", "q"),
    ("self_attn.q_proj.bias", "rows", "q"),
    ("self_attn.k_proj.weight", "rows", "kv"),
    ("self_attn.k_proj.bias", "rows", "kv"),
    ("self_attn.v_proj.weight", "rows", "kv"),
    ("self_attn.v_proj.bias", "rows", "kv"),
    ("self_attn.o_proj.weight", "cols", "q"),
    ("mlp.gate_proj.weight", "rows", "mlp"),
    ("mlp.up_proj.weight", "rows", "mlp"),
    ("mlp.down_proj.weight", "cols", "mlp"),
]


def shard_weights(cfg: ModelConfig, weights: dict, rank: int, tp: int) -> dict:
    """Rank `rank`'s weight dict for a LlamaModel built with shard_config(cfg, tp)."""
    check_degree(cfg, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside [0, {tp})")
    d = cfg.head_dim
    per = {"q": cfg.num_heads // tp * d, "kv": cfg.num_kv_heads // tp * d,
           "mlp": cfg.intermediate_size // tp}
    out: dict = {}
    for name, t in weights.items():
        split = next((s for s in SPLITS if name.endswith(s[0])), None)
        if name == "lm_head.weight":
            continue
        if split is None:
            out[name] = t   # norms, the embedding table, rope factors: replicated
            continue
        _, how, unit = split
        out[name] = (_rows if how == "rows" else _cols)(_dense(t), rank, per[unit])
    out["lm_head.weight"] = lm_head_shard(cfg, weights, rank, tp)
    return out
