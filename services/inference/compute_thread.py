"""One thread of this process runs every forward and every KV-block copy.

Why: OpenMP (libgomp, which torch's CPU ops and MKL use) keeps a team of worker threads for each
thread that calls into it. Steps arriving on gRPC's pool of handler threads would each start a
team of their own, and a finished team's workers spin for a while before they sleep, on the very
cores the next step's team computes on. Measured on 2 cores, the serve-throughput workload
through llmosd: 80 tok/s with steps on the handler threads, 112 tok/s on this one thread.

Other heavy work (a model's load) runs on a passing thread, whose team ends with it: while a
second team lives, the process has more OpenMP threads than cores, and libgomp then lets idle
workers spin only ~100 times before they sleep, so every parallel region of every step pays a
sleep and a wake. Measured on 2 cores (AVX-512), the embedded model's matmuls for one decode row
on this thread: int8 26.9 -> 11.1 ms, fp32 43.5 -> 33.9 ms once the loading thread had ended."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_pool = ThreadPoolExecutor(1, thread_name_prefix="compute")
_ident: list[int] = []   # the compute thread's ident, once it has run something


def _mark() -> None:
    _ident.append(threading.get_ident())


_pool.submit(_mark).result()


def on_compute_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on the compute thread (directly if this is it); its exception is raised here."""
    if threading.get_ident() == _ident[0]:
        return fn(*args)
    return _pool.submit(fn, *args).result()


def on_passing_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """fn(*args, **kwargs) on a new thread that ends when fn returns, taking its OpenMP team
    with it (see above); its exception is raised here."""
    with ThreadPoolExecutor(1, thread_name_prefix="passing") as pool:
        return pool.submit(fn, *args, **kwargs).result()
