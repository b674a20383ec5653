"""Llama's RMSNorm for the CPU's fp32 rows, optionally with the residual add before it fused in
(drivers/cpu/rms_norm.c), or the PyTorch ops where no C compiler is found or the rows are not
plain fp32 rows."""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from llmasos.drivers.cpu.build import native_function

P, I64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("rms_norm", [P, I64, P, I64, P, ctypes.c_float, P, I64, I64,
                                        ctypes.c_int], None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A fresh [.., k] tensor: x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    return _norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> torch.Tensor:
    """x += delta in place (the residual stream), then rms_norm(x), in one pass over the rows."""
    return _norm(x, delta, weight, eps)


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> torch.Tensor:
    fn = _kernel()
    rows = (x,) if delta is None else (x, delta)
    # the C serves fp32 CPU rows [n, k] laid out along k (a row stride is fine)
    if fn is None or weight.dtype != torch.float32 or not weight.is_contiguous() or \
            (delta is not None and delta.shape != x.shape) or \
            not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and
                    t.stride(1) == 1 for t in rows):
        return F.rms_norm(x if delta is None else x.add_(delta), (x.shape[-1],), weight, eps)
    n, k = x.shape
    out = torch.empty(n, k)
    fn(x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
       0 if delta is None else delta.stride(0), weight.data_ptr(), eps, out.data_ptr(), n, k,
       torch.get_num_threads())
    return out
