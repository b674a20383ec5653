"""Each row divided by its absolute maximum (after smoothing), for the int8 linear's per-row
activation scales (drivers/quant/cpu_int8.py): row_scale.c in one call, or the same PyTorch ops
where no C compiler is found. Both give the same bits."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from llmasos.drivers.cpu.build import native_function

P, I64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("row_scale", [P, I64, P, P, P, I64, I64, ctypes.c_int], None)


def row_scale(x: torch.Tensor, inv_smooth: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, amax): rows [n, k] = x * inv_smooth / amax, a fresh tensor; amax [n, 1] the
    largest |x * inv_smooth| of each row, at least 1e-30. x [n, k] fp32 is left as it is."""
    fn = _kernel()
    if fn is None or x.dtype != torch.float32 or x.stride(1) != 1 or (
            inv_smooth is not None and not (inv_smooth.dtype == torch.float32 and
                                            inv_smooth.is_contiguous())):
        return torch_row_scale(x, inv_smooth)
    n, k = x.shape
    rows, amax = torch.empty(n, k), torch.empty(n, 1)
    fn(x.data_ptr(), x.stride(0), None if inv_smooth is None else inv_smooth.data_ptr(),
       rows.data_ptr(), amax.data_ptr(), n, k, torch.get_num_threads())
    return rows, amax


def torch_row_scale(x: torch.Tensor, inv_smooth: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x * inv_smooth if inv_smooth is not None else x.to(torch.float32, copy=True)
    # max|row| as abs then amax: the same bits as vector_norm(inf), whose CPU reduction is
    # ~10x slower from 32 rows up (46 against 5 us at [32, 576], 2 cores)
    amax = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
    return rows.div_(amax), amax
