"""Greedy rows of a step's logits (drivers/cpu/greedy.c): each row's first maximum and its
log-probability in one call, or None where the C cannot serve (the sampler's PyTorch ops then
do)."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from llmasos.drivers.cpu.build import native_function

P, I64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("greedy", [P, I64, I64, I64, P, P, ctypes.c_int], None)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token [n] int64, logprob [n] fp32) for fp32 CPU logits [n, v] laid out along v; None
    for anything else or where no C compiler is found."""
    fn = _kernel()
    if fn is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or \
            logits.dim() != 2 or logits.stride(1) != 1 or logits.shape[1] == 0:
        return None
    n, v = logits.shape
    token, logprob = torch.empty(n, dtype=torch.int64), torch.empty(n)
    fn(logits.data_ptr(), logits.stride(0), n, v, token.data_ptr(), logprob.data_ptr(),
       torch.get_num_threads())
    return token, logprob
