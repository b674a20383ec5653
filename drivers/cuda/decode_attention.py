"""Paged decode attention, split-KV flash-decoding (SGLang's grouped Triton decode, in small).

Stage 1 runs programs over (sequence, kv head, split). Each does an online softmax (exp2) over
its slice of the sequence, reading K/V through the block table, with the GQA query heads of
its KV head packed into the rows of tl.dot, and writes a normalised partial output plus its
log2-sum-exp. Stage 2 merges the splits of each (sequence, query head).
"""

# Triton kernel arguments are untyped and constexprs are upper case by convention.
# ruff: noqa: ANN001, N803

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmasos.drivers.cuda.device import num_sms

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # below this a split's launch cost outweighs its share of bandwidth


@triton.jit(do_not_specialize=["num_splits"])  # one compile for any split count
def _decode_stage1(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, part_ptr, lse_ptr,
    qk_scale, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    hd_mask = (offs_h < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hd_mask, other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        off = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    nonempty = l_i > 0  # a split past the sequence's end ran no iterations
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    p_off = b * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(part_ptr + p_off[:, None] + offs_d[None, :], out, mask=hd_mask)
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=offs_h < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_stage2(
    part_ptr, lse_ptr, o_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty sequence gives zeros, not NaN
    w = tl.exp2(lse - m)
    den = tl.sum(w, 0)
    den = tl.where(den == 0.0, 1.0, den)
    parts = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                    + offs_d[None, :], mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
                    other=0.0)
    out = tl.sum(parts * w[:, None], 0) / den
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays near-exact on tensor cores (3 tf32 passes); 16-bit inputs ignore it
    return "tf32x3" if dtype == torch.float32 else "tf32"


def stage1_meta(block_size: int, group: int, head_dim: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim,
                BLOCK_H=max(16, triton.next_power_of_2(group)),  # an mma tile's 16 rows
                BLOCK_N=64 if head_dim <= 64 else 32,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISION=dot_precision(dtype))


def stage2_meta(head_dim: int, num_splits: int) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


def choose_splits(batch: int, kv_heads: int, max_tokens: int, sms: int) -> int:
    """Enough (seq, head, split) programs to fill the SMs twice, never splits under 256 tokens."""
    want = math.ceil(2 * sms / max(1, batch * kv_heads))
    return max(1, min(want, math.ceil(max_tokens / MIN_SPLIT_TOKENS), 64))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     *, num_splits: int | None = None) -> torch.Tensor:
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert q_heads % kv_heads == 0 and block_tables.stride(1) == 1
    if num_splits is None:
        num_splits = choose_splits(batch, kv_heads, block_tables.shape[1] * block_size,
                                   num_sms(q.device))
    out = torch.empty_like(q)
    if batch == 0:
        return out
    part = torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
    meta = stage1_meta(block_size, q_heads // kv_heads, head_dim, k_cache.dtype)
    _decode_stage1[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        **meta, num_warps=4, num_stages=2,
    )
    _decode_stage2[(batch, q_heads)](
        part, lse, out, num_splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        **stage2_meta(head_dim, num_splits), num_warps=1 if head_dim <= 64 else 2,
    )
    return out
