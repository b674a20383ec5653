"""The paged KV pool: one tensor [layers, 2, num_blocks, block_size, kv_heads, head_dim] sized
from a byte budget. The kernel's pager decides which blocks each sequence owns; this only holds
the memory and copies blocks on request."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import psutil
import torch


class KVBudgetError(MemoryError):
    """The requested KV budget does not fit in the device's free memory, or holds no block."""


@dataclass(frozen=True)
class PoolGeometry:
    num_blocks: int
    block_size: int
    block_bytes: int  # all layers, K and V, of one block
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str


def free_bytes(device: torch.device) -> int:
    """Memory a new pool may take: free device memory on CUDA, available RAM on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros. On the CPU an anonymous mapping, whose pages the OS zero-fills as they are first
    touched: a pool costs nothing until its blocks are used, where torch.zeros writes every page
    before the model can serve (~0.5 s for 256 MiB on a busy 2-core machine). Small pages only:
    a huge page would be found (compacting memory, on a busy machine) and zeroed whole for each
    12 KiB of a block first written (numpy's calloc asks for them; with it the first steps after
    a restart were seconds slower than with torch.zeros, at load 10-15)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)


class KVPool:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, budget_bytes: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        elem = torch.empty((), dtype=dtype).element_size()
        block_bytes = num_layers * 2 * block_size * kv_heads * head_dim * elem
        num_blocks = budget_bytes // block_bytes
        if num_blocks < 1:
            raise KVBudgetError(f"kv budget {budget_bytes} bytes holds no block "
                                f"({block_bytes} bytes each)")
        available = free_bytes(self.device)
        if num_blocks * block_bytes > available:
            raise KVBudgetError(f"kv budget {budget_bytes} bytes exceeds free memory on "
                                f"{self.device} ({available} bytes)")
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN is NaN
        self.kv = zeros((num_layers, 2, num_blocks, block_size, kv_heads, head_dim), dtype,
                        self.device)
        self.geometry = PoolGeometry(num_blocks, block_size, block_bytes, num_layers, kv_heads,
                                     head_dim, str(dtype).removeprefix("torch."),
                                     str(self.device))
        self._layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(num_layers)]  # views

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self._layers[i]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if len(src) != len(dst):
            raise ValueError("src and dst must have the same length")
        self.check(src + dst)
        self.kv[:, :, dst] = self.kv[:, :, src]

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """The blocks' contents copied to host memory (for swap-out)."""
        self.check(blocks)
        return self.kv[:, :, blocks].to("cpu", copy=True)

    def write_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        self.check(blocks)
        if data.shape[2] != len(blocks):
            raise ValueError(f"swap handle holds {data.shape[2]} blocks, got {len(blocks)}")
        self.kv[:, :, blocks] = data.to(self.device)

    def check(self, blocks: list[int]) -> None:
        bad = [b for b in blocks if not 0 <= b < self.geometry.num_blocks]
        if bad:
            raise ValueError(f"block ids out of range [0, {self.geometry.num_blocks}): {bad[:8]}")
