"""One thread of this process runs every forward and every KV-block copy.

Why: OpenMP (libgomp, which torch's CPU ops and MKL use) keeps a team of worker threads for each
thread that calls into it. Steps arriving on gRPC's pool of handler threads would each start a
team of their own, and a finished team's workers spin for a while before they sleep, on the very
cores the next step's team computes on. Measured on 2 cores, the serve-throughput workload
through llmosd: 80 tok/s with steps on the handler threads, 112 tok/s on this one thread."""

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
