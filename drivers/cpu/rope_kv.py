"""RoPE in place on the fused QKV rows and the step's K/V stored into the pool, in one call
(drivers/cpu/rope_kv.c) for the CPU's fp32 rows with full rotate-half rotary; False from
rope_kv() sends the caller to the PyTorch path (apply_rope, then write_kv). Both give the
same bits."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from llmasos.drivers.cpu.build import native_function

P, I64 = ctypes.c_void_p, ctypes.c_int64
ARGTYPES = [P, I64, P, P, I64, P, P, P, I64, I64, I64, I64, I64, ctypes.c_int, ctypes.c_int]
POOL_DTYPES = (torch.float32, torch.float16)


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("rope_kv", ARGTYPES, ctypes.c_int)


def fits(qkv: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """fp32 CPU rows laid out along the last dim, tables as wide as a head, a contiguous pool."""
    return (qkv.dtype == torch.float32 and qkv.device.type == "cpu" and qkv.dim() == 2 and
            qkv.stride(1) == 1 and cos.dtype == torch.float32 and cos.shape[-1] == head_dim and
            cos.is_contiguous() and head_dim % 2 == 0 and k_cache.dtype in POOL_DTYPES and
            k_cache.is_contiguous())


def rope_kv(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
            slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            q_heads: int) -> bool:
    """Rotate the Q and K heads of qkv [T, (q_heads + 2 kv_heads) * D] in place and store K and
    V at slot_mapping [T] of the pool layer [num_blocks, block_size, kv_heads, D]; False (and
    nothing done) where the C does not serve these tensors."""
    fn = _kernel()
    cos, sin = rope
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if fn is None or not fits(qkv, cos, k_cache, head_dim) or v_cache.dtype != k_cache.dtype \
            or not v_cache.is_contiguous() or slot_mapping.dtype != torch.int64 or \
            not slot_mapping.is_contiguous():
        return False
    t = qkv.shape[0]
    slots = k_cache.shape[0] * k_cache.shape[1]
    status = fn(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), head_dim,
                slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots, t,
                q_heads, kv_heads, head_dim, k_cache.dtype == torch.float16,
                torch.get_num_threads())
    if status != 0:
        raise IndexError(f"a KV slot of this step lies outside the pool's {slots} slots")
    return True
