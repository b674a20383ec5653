"""Weight-only quantized matmul y = x @ W.T, one kernel for the four layouts in quant.py.

Each K tile of W is dequantized in registers to x's dtype and fed to tl.dot (fp32 accumulate);
int8's per-channel scale is applied once at the end. GGUF Q8_0/Q4_1 are read as the file's
bytes. Small M (decode) uses 16-row tiles and split-K to fill the SMs; large M uses big tiles.
"""

# Triton kernel arguments are untyped and constexprs are upper case by convention.
# ruff: noqa: ANN001, N803

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmasos.drivers.cuda.decode_attention import dot_precision
from llmasos.drivers.cuda.device import num_sms
from llmasos.drivers.cuda.quant import QuantWeight

FMT_IDS = {"int8": 0, "int4": 1, "q8_0": 2, "q4_1": 3}
SMALL_M = 16  # up to here the GEMV-shaped config wins (weights dominate the traffic)


@triton.jit
def _f16_at(byte_ptr, off):
    # an fp16 from two bytes: GGUF blocks are only 2-byte aligned
    lo = tl.load(byte_ptr + off).to(tl.uint16)
    hi = tl.load(byte_ptr + off + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, stride_wn, stride_sn,
                 FMT: tl.constexpr, GROUP: tl.constexpr):
    """W.T[offs_k, offs_n] as fp32 (int8: unscaled). Callers clamp offsets in range."""
    k = offs_k[:, None]
    n = offs_n[None, :].to(tl.int64)
    if FMT == 0:
        w = tl.load(w_ptr + n * stride_wn + k).to(tl.float32)
    elif FMT == 1:
        byte = tl.load(w_ptr + n * stride_wn + k // 2)
        q = ((byte >> ((k % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
        g = n * stride_sn + k // GROUP
        w = q * tl.load(s_ptr + g).to(tl.float32) + tl.load(z_ptr + g).to(tl.float32)
    elif FMT == 2:
        blk = w_ptr + n * stride_wn + (k // 32) * 34
        q = tl.load(blk + 2 + k % 32).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * _f16_at(blk, 0)
    else:
        blk = w_ptr + n * stride_wn + (k // 32) * 20
        j = k % 32
        byte = tl.load(blk + 4 + j % 16)
        q = ((byte >> ((j // 16) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
        w = q * _f16_at(blk, 0) + _f16_at(blk, 2)
    return w


@triton.jit
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
        w = _weight_tile(w_ptr, s_ptr, z_ptr, tl.minimum(offs_k, K - 1), n_safe,
                         stride_wn, stride_sn, FMT, GROUP)
        w = tl.where(k_mask[:, None], w, 0.0)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    if FMT == 0:
        acc *= tl.load(s_ptr + n_safe).to(tl.float32)[None, :]
    y = y_ptr + split * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


SMALL_CONFIG = MatmulConfig(16, 64, 128, 4, 3)
LARGE_CONFIG = MatmulConfig(64, 128, 64, 8, 3)
LARGE_CONFIG_FP32 = MatmulConfig(64, 64, 32, 4, 2)  # fp32 tiles are twice the bytes


def choose_config(m: int, dtype: torch.dtype) -> MatmulConfig:
    if m <= SMALL_M:
        return SMALL_CONFIG
    return LARGE_CONFIG_FP32 if dtype == torch.float32 else LARGE_CONFIG


def choose_split_k(tiles: int, k: int, cfg: MatmulConfig, sms: int) -> int:
    """Split K until the grid fills the SMs, keeping at least 4 K tiles per split."""
    split = 1
    while tiles * split < sms and k // (cfg.block_k * split * 2) >= 4:
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
        _qmm_kernel[(tiles, split_k)](
            x2, qw.qweight, scale, offset, y, m, n, k, k_per_split,
            x2.stride(0), qw.qweight.stride(0), scale.stride(0) if qw.fmt == "int4" else 0,
            n, m * n,
            **kernel_meta(qw, cfg, x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if split_k > 1:
        y = y.sum(0).to(x.dtype)
    return y.reshape(*lead, n)
