"""The KV pool on the CPU: zeros that cost nothing until used (calloc'd pages the OS fills as
they are first touched), so a restarted inference service is not held up writing its pool."""

from __future__ import annotations

import psutil
import torch

from llmasos.drivers.model.kv_pool import KVPool


def test_a_cpu_pool_is_zero_writable_and_resident_only_where_touched() -> None:
    rss = psutil.Process().memory_info().rss
    pool = KVPool(num_layers=8, kv_heads=4, head_dim=64, budget_bytes=256 << 20, block_size=16)
    assert pool.kv.dtype == torch.float32 and pool.kv.is_contiguous()
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 32 << 20, f"an unused 256 MiB pool made {grown >> 20} MiB resident"
    k, v = pool.layer(3)
    assert not k[:4].any() and not v[-4:].any()   # reads as zeros (no NaN garbage)
    k[1, 2] = 1.5
    assert pool.kv[3, 0, 1, 2].eq(1.5).all() and pool.kv.sum().item() == 1.5 * 4 * 64
    assert pool.read_blocks([1]).shape[2] == 1   # the pool's own copies work on it
