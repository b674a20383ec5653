"""Weight-only quantized matmul y = x @ W.T for the four layouts in quant.py.

Each K tile of W is dequantized in registers (whole int4 groups / GGUF blocks at a time) and
fed to tl.dot in x's dtype with fp32 accumulation; int8's per-channel scale is applied once at
the end. GGUF Q8_0/Q4_1 are read as the file's bytes. M = 1 takes a GEMV kernel without
tl.dot; small M (decode batches) 16-row tiles; both split K to fill the SMs; large M big tiles.
"""

# Triton kernel arguments are untyped and constexprs are upper case by convention.
# ruff: noqa: ANN001, N803, N806

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmasos.drivers.cuda.decode_attention import dot_precision
from llmasos.drivers.cuda.device import num_sms
from llmasos.drivers.cuda.quant import QuantWeight

FMT_IDS = {"int8": 0, "int4": 1, "q8_0": 2, "q4_1": 3}
SMALL_M = 16  # up to here W dominates the traffic: one 16-row tile, split K to fill the SMs


@triton.jit
def _f16_at(byte_ptr, off):
    # an fp16 from two bytes: GGUF blocks are only 2-byte aligned
    lo = tl.load(byte_ptr + off).to(tl.uint16)
    hi = tl.load(byte_ptr + off + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibbles(b, AXIS: tl.constexpr):
    """Split bytes into (low, high) nibbles stacked along AXIS: [.., n, ..] -> [.., 2n, ..]."""
    pair = tl.join(b & 0xF, b >> 4)  # the pair is the last axis
    if AXIS == 0:  # [n, BN, 2] -> [n, 2, BN]: byte i gives k = 2i, 2i+1
        q = tl.permute(pair, (0, 2, 1))
        return tl.reshape(q, (2 * q.shape[0], q.shape[2]))
    else:  # [nb, 16, BN, 2] -> [nb, 2, 16, BN]: byte j gives k = j, j + 16
        q = tl.permute(pair, (0, 3, 1, 2))
        return tl.reshape(q, (q.shape[0], 2 * q.shape[2], q.shape[3]))


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, k0, K, offs_n, stride_wn, stride_sn,
                 FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """W.T[k0 : k0 + BLOCK_K, offs_n] as fp32 (int8: unscaled). Past K: finite junk."""
    row = w_ptr + offs_n.to(tl.int64) * stride_wn
    if FMT == 0:
        k = tl.minimum(k0 + tl.arange(0, BLOCK_K), K - 1)
        w = tl.load(row[None, :] + k[:, None]).to(tl.float32)
    elif FMT == 1:
        kb = tl.minimum(k0 // 2 + tl.arange(0, BLOCK_K // 2), K // 2 - 1)
        q = _nibbles(tl.load(row[None, :] + kb[:, None]), 0).to(tl.float32)
        NG: tl.constexpr = max(BLOCK_K // GROUP, 1)  # groups per tile
        g = tl.minimum((k0 + tl.arange(0, NG) * (BLOCK_K // NG)) // GROUP, K // GROUP - 1)
        sz = offs_n.to(tl.int64)[None, :] * stride_sn + g[:, None]
        s = tl.load(s_ptr + sz).to(tl.float32)[:, None, :]
        z = tl.load(z_ptr + sz).to(tl.float32)[:, None, :]
        w = tl.reshape(tl.reshape(q, (NG, BLOCK_K // NG, BLOCK_N)) * s + z, (BLOCK_K, BLOCK_N))
    else:
        NB: tl.constexpr = BLOCK_K // 32  # GGUF blocks per tile
        bi = tl.minimum(k0 // 32 + tl.arange(0, NB), K // 32 - 1)
        if FMT == 2:
            blk = row[None, :] + bi[:, None] * 34
            q = tl.load(blk[:, None, :] + 2 + tl.arange(0, 32)[None, :, None])
            q = q.to(tl.int8, bitcast=True).to(tl.float32)
            w = q * _f16_at(blk, 0)[:, None, :]
        else:
            blk = row[None, :] + bi[:, None] * 20
            b = tl.load(blk[:, None, :] + 4 + tl.arange(0, 16)[None, :, None])
            q = _nibbles(b, 1).to(tl.float32)
            w = q * _f16_at(blk, 0)[:, None, :] + _f16_at(blk, 2)[:, None, :]
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))
    return w


@triton.jit(do_not_specialize=["M", "stride_ys"])  # batch sizes vary step to step
def _qmm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
    FMT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_safe = tl.minimum(offs_n, N - 1)  # clamped rows load real bytes and are never stored
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(x_row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, k0, K, n_safe, stride_wn, stride_sn,
                         FMT, GROUP, BLOCK_K, BLOCK_N)
        w = tl.where(k_mask[:, None], w, 0.0)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    if FMT == 0:
        acc *= tl.load(s_ptr + n_safe).to(tl.float32)[None, :]
    y = y_ptr + split * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["M", "stride_ys"])
def _qgemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
    FMT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One row of x per program, no tl.dot: products pile up in a [BLOCK_K, BLOCK_N] register
    tile and are reduced once at the end, so the loop is loads, dequant and FMAs only."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    row = pid // tiles_n
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_safe = tl.minimum(offs_n, N - 1)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, k0, K, n_safe, stride_wn, stride_sn,
                         FMT, GROUP, BLOCK_K, BLOCK_N)
        acc += w * x[:, None]  # past K: x is 0 and w is finite (clamped loads)
    y = tl.sum(acc, 0)
    if FMT == 0:
        y *= tl.load(s_ptr + n_safe).to(tl.float32)
    out = y_ptr + split * stride_ys + row.to(tl.int64) * stride_ym + offs_n
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# BLOCK_K is a multiple of 32 (one GGUF block) and of every int4 group or a divisor of it.
# block_m == 1 selects the GEMV kernel (M = 1: decode of one sequence).
GEMV_CONFIG = MatmulConfig(1, 16, 256, 4, 4)
SMALL_CONFIG = MatmulConfig(16, 32, 128, 4, 4)  # narrow N tiles: N/32 programs stream W
MEDIUM_CONFIG = MatmulConfig(64, 64, 64, 4, 3)
LARGE_CONFIG = MatmulConfig(128, 128, 64, 8, 3)
FP32_CONFIG = MatmulConfig(64, 64, 32, 4, 2)  # fp32 tiles are twice the bytes


def choose_config(m: int, dtype: torch.dtype) -> MatmulConfig:
    if m == 1:
        return GEMV_CONFIG
    if m <= SMALL_M:
        return SMALL_CONFIG
    if dtype == torch.float32:
        return FP32_CONFIG
    return MEDIUM_CONFIG if m <= 64 else LARGE_CONFIG


def choose_split_k(tiles: int, k: int, cfg: MatmulConfig, sms: int) -> int:
    """Split K while under half the SMs have a program, keeping >= 4 K tiles per split."""
    split = 1
    while 2 * tiles * split <= sms and k // (cfg.block_k * split * 2) >= 4:
        split *= 2
    return split


def kernel_meta(qw: QuantWeight, cfg: MatmulConfig, dtype: torch.dtype) -> dict:
    return dict(FMT=FMT_IDS[qw.fmt], GROUP=max(qw.group_size, 1), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=dot_precision(dtype))


def quant_linear(x: torch.Tensor, qw: QuantWeight, *, config: MatmulConfig | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    assert k == qw.in_features, (k, qw.in_features)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], qw.out_features
    cfg = config or choose_config(m, x.dtype)
    kernel = _qgemv_kernel if cfg.block_m == 1 else _qmm_kernel
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if split_k is None:
        split_k = choose_split_k(tiles, k, cfg, num_sms(x.device)) if m <= SMALL_M else 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    scale = qw.scale if qw.scale is not None else qw.qweight
    offset = qw.offset if qw.offset is not None else scale
    if m > 0:
        kernel[(tiles, split_k)](
            x2, qw.qweight, scale, offset, y, m, n, k, k_per_split,
            x2.stride(0), qw.qweight.stride(0), scale.stride(0) if qw.fmt == "int4" else 0,
            n, m * n,
            **kernel_meta(qw, cfg, x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if split_k > 1:
        y = y.sum(0).to(x.dtype)
    return y.reshape(*lead, n)
