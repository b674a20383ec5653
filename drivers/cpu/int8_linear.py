"""The int8 linear's native kernel (drivers/cpu/int8_linear.c): weights packed in its block
layout, activations quantized per row inside the call. It serves x86 CPUs with AVX2 or
AVX-512 VNNI; elsewhere (isa() == 0) the quantized engines of drivers/quant/cpu_int8.py do."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch

from llmasos.drivers.cpu.build import load_library, native_function

P, I64 = ctypes.c_void_p, ctypes.c_int64
BLOCK = 16   # output channels a block (the C's BLOCK)
LEVELS = 127  # activations and weights are symmetric int8 in [-127, 127]


ARGTYPES = [P, I64, P, I64, P, ctypes.c_float, P, I64, I64, P, P, P, P, I64, P, I64, ctypes.c_int,
            ctypes.c_int]


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("int8_linear", ARGTYPES, ctypes.c_int)


def isa() -> int:
    """512 (AVX-512 VNNI), 256 (AVX2) or 0 (the scalar C, or no library): what the kernel was
    built to use on this CPU."""
    lib = load_library("int8_linear")
    return int(lib.int8_linear_isa()) if lib is not None else 0


@dataclass(eq=False)
class PackedInt8:
    """W [n, k] int8 in the kernel's layout [n/16, k/4, 16, 4] (padded with zeros)."""

    w: torch.Tensor          # int8 [ceil(n/16), ceil(k/4), 16, 4]
    scale: torch.Tensor      # fp32 [n]: the weight's per-channel scale, W ~ q * scale
    col_scale: torch.Tensor  # fp32 [n]: scale / 127, what the kernel multiplies by
    colsum128: torch.Tensor  # int32 [n]: 128 * sum_k W, what VNNI's unsigned rows add
    n: int
    k: int

    def __post_init__(self) -> None:   # the call's weight arguments, taken once
        self.ptrs = (self.w.data_ptr(), self.col_scale.data_ptr(), self.colsum128.data_ptr())

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.scale.nbytes + self.col_scale.nbytes + self.colsum128.nbytes


def pack(q: torch.Tensor, scale: torch.Tensor) -> PackedInt8:
    """q int8 [n, k] in [-127, 127] (a -128 is clamped to -127: AVX2's sign trick needs the
    symmetric range) with per-channel scale [n], as quantize_weight makes them."""
    n, k = q.shape
    kp, np_ = -(-k // 4) * 4, -(-n // BLOCK) * BLOCK
    padded = torch.zeros(np_, kp, dtype=torch.int8)
    padded[:n, :k] = q.clamp(min=-LEVELS)
    w = padded.view(np_ // BLOCK, BLOCK, kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    colsum = padded[:n].sum(dim=1, dtype=torch.int32) * 128
    scale = scale.float().contiguous()
    return PackedInt8(w, scale, scale / LEVELS, colsum.contiguous(), n, k)


def unpack(p: PackedInt8) -> torch.Tensor:
    """q int8 [n, k] back from the packed layout."""
    kp = p.w.shape[1] * 4
    return p.w.permute(0, 2, 1, 3).reshape(-1, kp)[:p.n, :p.k].contiguous()


def typed(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    """The library's int8_linear, typed (for a library built for another ISA, in the tests)."""
    fn = lib.int8_linear
    fn.argtypes, fn.restype = ARGTYPES, ctypes.c_int
    return fn


@dataclass(frozen=True)
class Norm:
    """The RMSNorm folded into a linear's rows: weight [k] fp32, and the residual add before it
    (delta [m, k] fp32 rows along k, added into x in place), as rms_norm.add_rms_norm does."""

    weight: torch.Tensor
    eps: float
    delta: torch.Tensor | None = None


def int8_linear(x: torch.Tensor, p: PackedInt8, inv_smooth: torch.Tensor | None,
                bias: torch.Tensor | None, fn: ctypes._CFuncPtr | None = None,
                gated: bool = False, norm: Norm | None = None) -> torch.Tensor:
    """y [m, n] = x [m, k] (fp32, rows along k) through the packed weight, + bias (fp32 [n],
    contiguous, as inv_smooth [k]). gated: x [m, 2k] holds a gated MLP's [gate | up] rows, and
    the linear takes silu(gate) * up (computed in the C, within ~2 ulp of F.silu's). norm: the
    linear takes RMSNorm(x + delta), x += delta written back."""
    fn = fn or _kernel()
    if fn is None:
        raise RuntimeError("the int8_linear kernel could not be built; deploy with the "
                           "quantized engines (drivers/quant/cpu_int8.py) instead")
    width = 2 * p.k if gated else p.k
    delta = None if norm is None else norm.delta
    for t in (x,) if delta is None else (x, delta):   # the call's own checks: a cheap path
        if t.dtype != torch.float32 or t.dim() != 2 or t.stride(1) != 1 or \
                t.shape[1] != width or t.shape[0] != x.shape[0]:
            raise ValueError(f"int8_linear takes fp32 rows [m, {width}] laid out along k, got "
                             f"{t.dtype} {tuple(t.shape)} with strides {t.stride()}")
    m = x.shape[0]
    y = torch.empty(m, p.n)
    w, col_scale, colsum128 = p.ptrs
    if fn(x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
          0 if delta is None else delta.stride(0), None if norm is None else norm.weight.data_ptr(),
          0.0 if norm is None else norm.eps, None if inv_smooth is None else inv_smooth.data_ptr(),
          m, p.k, w, col_scale, colsum128, None if bias is None else bias.data_ptr(), p.n,
          y.data_ptr(), p.n, gated, torch.get_num_threads()) != 0:
        raise MemoryError(f"int8_linear: no memory for {m} quantized rows of {p.k}")
    return y
