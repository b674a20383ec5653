"""Prefill attention over a paged, cached prefix: FlashAttention-2 style, online softmax in exp2.

The chunk's K/V are already in the pool. Query i of sequence s sits at position
ctx_s + i with ctx_s = seq_lens[s] - q_len_s; it sees the prefix unmasked and the chunk causally.
The grid is (query tiles, query heads) with at most cdiv(T, BLOCK_M) + S tiles; each program
finds its sequence from cu_seqlens_q itself, so the host never reads lengths back (no sync).
"""

# Triton kernel arguments are untyped and constexprs are upper case by convention.
# ruff: noqa: ANN001, N803

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmasos.drivers.cuda.decode_attention import LOG2E, dot_precision


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, n0, pos_q, seq_len, kvh,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    pos = n0 + tl.arange(0, BLOCK_N)
    n_mask = pos < seq_len
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    off = pos % BLOCK_SIZE
    kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[:, None]
                + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        causal = (pos[None, :] <= pos_q[:, None]) & n_mask[None, :]
        qk = tl.where(causal, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None]
                + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs"])  # one compile per BLOCK_S, not per batch
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_ptr, lens_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    # which sequence owns this tile: count sequences whose tiles all come before it
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_seqs
    q_lens = (tl.load(cu_ptr + offs_s + 1, mask=s_mask, other=0)
              - tl.load(cu_ptr + offs_s, mask=s_mask, other=0))
    n_tiles = (q_lens + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(n_tiles, 0)
    seq = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    if seq < num_seqs:
        m_tile = tile - tl.sum(tl.where(offs_s < seq, n_tiles, 0), 0)
        q_start = tl.load(cu_ptr + seq)
        q_len = tl.load(cu_ptr + seq + 1) - q_start
        seq_len = tl.load(lens_ptr + seq)
        ctx = seq_len - q_len

        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        qd_mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=qd_mask, other=0.0)
        pos_q = ctx + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        # keys every row of the tile sees: no mask
        lo_end = (ctx + m_tile * BLOCK_M) // BLOCK_N * BLOCK_N
        for n0 in range(0, lo_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, n0, pos_q, seq_len, kvh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
                BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, False, PRECISION)
        # the diagonal: causal mask
        hi_end = tl.minimum(seq_len, ctx + (m_tile + 1) * BLOCK_M)
        for n0 in range(lo_end, hi_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, n0, pos_q, seq_len, kvh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
                BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, True, PRECISION)
        out = acc / l_i[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=qd_mask)


def prefill_meta(block_size: int, group: int, head_dim: int, num_seqs: int,
                 dtype: torch.dtype) -> dict:
    wide = head_dim > 64 or dtype == torch.float32  # keep the tiles inside sm_90's registers
    return dict(BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim,
                BLOCK_M=64, BLOCK_N=32 if wide else 64,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_S=max(2, triton.next_power_of_2(num_seqs)), PRECISION=dot_precision(dtype))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    tokens, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert q_heads % kv_heads == 0 and block_tables.stride(1) == 1
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    meta = prefill_meta(block_size, q_heads // kv_heads, head_dim, num_seqs, k_cache.dtype)
    grid = (triton.cdiv(tokens, meta["BLOCK_M"]) + num_seqs, q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        **meta, num_warps=4, num_stages=2,
    )
    return out
