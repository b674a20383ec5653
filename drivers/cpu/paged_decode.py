"""Decode attention read in place from the paged KV pool (paged_decode.c), for the CPU's fp32
decode groups (the pool fp32 or fp16): a drop-in for attention.group_attention where each
sequence has one query.

Used when the library builds on this machine and the shape fits (fp32, head_dim a multiple of
16 up to 256, at most 16 query heads per KV head, blocks of a power of two tokens, no sliding
window or soft-capping). LLMASOS_CPU_ATTENTION=sdpa keeps the PyTorch path (gather the blocks,
then SDPA) instead."""

from __future__ import annotations

import ctypes
import os

import torch

from llmasos.drivers.cpu.build import native_function
from llmasos.drivers.model.attention import PagedGroup, group_attention

MODE_ENV = "LLMASOS_CPU_ATTENTION"   # "native" (default) or "sdpa"
P, I64 = ctypes.c_void_p, ctypes.c_int64
ARGTYPES = [P, I64, P, P, P, I64, P, P, I64, I64, I64, I64, I64, ctypes.c_float, ctypes.c_int,
            P, I64, ctypes.c_int]
KV_DTYPES = (torch.float32, torch.float16)   # the pool's widths the C reads (fp16: widened)


def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("paged_decode", ARGTYPES, ctypes.c_int)


def typed(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    """The library's paged_decode, typed (for a library built for another ISA, in the tests)."""
    fn = lib.paged_decode
    fn.argtypes, fn.restype = ARGTYPES, ctypes.c_int
    return fn


def fits(dtype: torch.dtype, device: torch.device, head_dim: int, gqa: int) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and head_dim % 16 == 0
            and 16 <= head_dim <= 256 and 1 <= gqa <= 16)


def decode_kernel(dtype: torch.dtype, device: torch.device, head_dim: int, gqa: int
                  ) -> PagedDecode | None:
    """The native decode attention for a model of this shape, or None (PyTorch path)."""
    if os.environ.get(MODE_ENV, "native") == "sdpa" or not fits(dtype, device, head_dim, gqa):
        return None
    fn = _kernel()
    return None if fn is None else PagedDecode(fn)


class PagedDecode:
    def __init__(self, fn: ctypes._CFuncPtr) -> None:
        self.fn = fn

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 group: PagedGroup, scale: float) -> torch.Tensor:
        """q: the flat batch's [T, Hq, D]; returns [S, Hq, D] for the group's rows (one query
        each), as group_attention does."""
        s = group.num_seqs
        _, num_heads, head_dim = q.shape
        kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        if block_size & (block_size - 1):   # the C indexes blocks by shift and mask
            return group_attention(q, k_cache, v_cache, group, scale)
        if q.dtype != torch.float32 or k_cache.dtype not in KV_DTYPES or \
                v_cache.dtype != k_cache.dtype:
            raise TypeError(f"paged_decode takes fp32 queries and an fp32 or fp16 pool, got "
                            f"{q.dtype} and {k_cache.dtype}")
        if group.identity:   # the group's rows in order: all of q (a decode-only step), or a slice
            rows = q if group.first_row == 0 and s == q.shape[0] else \
                q[group.first_row:group.first_row + s]
        else:
            rows = q[group.query_rows]
        if rows.stride(2) != 1 or rows.stride(1) != head_dim:
            rows = rows.contiguous()   # heads must lie one after another within a row
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the KV pool's layer views must be contiguous")
        tables, lens = group.kv_blocks, group.seq_lens
        threads = torch.get_num_threads()
        scratch = torch.empty(threads, group.max_len * (num_heads // kv_heads))
        out = torch.empty(s, num_heads, head_dim)
        status = self.fn(rows.data_ptr(), rows.stride(0), k_cache.data_ptr(),
                         v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                         lens.data_ptr(), out.data_ptr(), s, block_size, kv_heads,
                         num_heads // kv_heads, head_dim, scale, threads, scratch.data_ptr(),
                         scratch.shape[1], k_cache.dtype == torch.float16)
        if status != 0:
            raise ValueError(f"paged_decode cannot serve head_dim {head_dim} with "
                             f"{num_heads // kv_heads} query heads per KV head")
        return out
