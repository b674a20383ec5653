"""PyTorch references for the attention kernels: plain loops in fp32, for tests and benches."""

from __future__ import annotations

import torch


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` tokens as [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    return cache[block_table.long()[pos // block_size], pos % block_size]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
            scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    k_pos = torch.arange(k.shape[0], device=q.device)
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        k = gather_kv(k_cache, block_tables[b], n)
        v = gather_kv(v_cache, block_tables[b], n)
        pos = torch.tensor([n - 1], device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, pos, scale)[0].to(q.dtype)
    return out


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for s, n in enumerate(seq_lens.tolist()):
        a, b = cu[s], cu[s + 1]
        k = gather_kv(k_cache, block_tables[s], n)
        v = gather_kv(v_cache, block_tables[s], n)
        pos = torch.arange(n - (b - a), n, device=q.device)
        out[a:b] = _attend(q[a:b], k, v, pos, scale).to(q.dtype)
    return out
