"""The fp32 linear's native kernel (drivers/cpu/packed_linear.c): the weight copied once into
panels of 16 output channels, [n/16, k, 16], which a step streams from memory in order while each
row's 16 sums stay in registers. The copy sits beside the dense weight, kept on the tensor; the
load-time probe (drivers/model/cpu_linear.py) makes it, times it against MKL and oneDNN per row
regime, and drops it where it wins none."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch

from llmasos.drivers.cpu.build import native_function
from llmasos.drivers.model.ranges import named_range

P, I64 = ctypes.c_void_p, ctypes.c_int64
PANEL = 16   # output channels a panel (the C's PANEL)
ARGTYPES = [P, I64, I64, I64, P, P, I64, P, I64, ctypes.c_int]
ATTRIBUTE = "_llmasos_packed"   # where a dense weight keeps its packed copy


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("packed_linear", ARGTYPES, None)


def available() -> bool:
    return _kernel() is not None


def typed(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    """The library's packed_linear, typed (for a library built for another ISA, in the tests)."""
    fn = lib.packed_linear
    fn.argtypes, fn.restype = ARGTYPES, None
    return fn


@dataclass(eq=False)
class PackedF32:
    """W [n, k] fp32 as [ceil(n/16), k, 16], the last panel padded with zero channels."""

    w: torch.Tensor
    n: int
    k: int


@cache
def _packer() -> ctypes._CFuncPtr | None:
    return native_function("packed_linear", [P, I64, I64, P, ctypes.c_int], None,
                           symbol="packed_linear_pack")


def pack(w: torch.Tensor) -> PackedF32:
    """The copy, in one native pass over w where the library builds (a model's weights at
    load: a restart waits for it), else through torch."""
    n, k = w.shape
    panels = -(-n // PANEL)
    fn = _packer() if w.dtype == torch.float32 and w.is_contiguous() else None
    if fn is not None:
        out = torch.empty(panels, k, PANEL)
        fn(w.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
        return PackedF32(out, n, k)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.float32)
    padded[:n] = w
    return PackedF32(padded.view(-1, PANEL, k).transpose(1, 2).contiguous(), n, k)


def unpack(p: PackedF32) -> torch.Tensor:
    return p.w.transpose(1, 2).reshape(-1, p.k)[:p.n].contiguous()


def packed_of(w: torch.Tensor) -> PackedF32:
    """w's packed copy, made at the first call and kept on the tensor (freed with it)."""
    p = getattr(w, ATTRIBUTE, None)
    if p is None:
        p = pack(w)
        setattr(w, ATTRIBUTE, p)
    return p


def packed_bytes(w: torch.Tensor) -> int:
    """The bytes of w's packed copy (0: none)."""
    p = getattr(w, ATTRIBUTE, None)
    return p.w.nbytes if p is not None else 0


def drop_packed(w: torch.Tensor) -> None:
    if hasattr(w, ATTRIBUTE):
        delattr(w, ATTRIBUTE)


def packed_linear(x: torch.Tensor, p: PackedF32, bias: torch.Tensor | None = None,
                  fn: ctypes._CFuncPtr | None = None) -> torch.Tensor:
    """y [m, n] = x [m, k] @ W.T + bias: x fp32 with rows along k, bias fp32 [n] contiguous."""
    fn = fn or _kernel()
    if fn is None:
        raise RuntimeError("the packed_linear kernel could not be built; the probe keeps MKL "
                           "or oneDNN where it is missing (drivers/model/cpu_linear.py)")
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != p.k:
        raise ValueError(f"packed_linear takes fp32 rows [m, {p.k}] laid out along k, got "
                         f"{x.dtype} {tuple(x.shape)} with strides {x.stride()}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                             or bias.numel() != p.n):
        raise ValueError(f"packed_linear's bias is fp32 [{p.n}] contiguous")
    m = x.shape[0]
    y = torch.empty(m, p.n)
    fn(x.data_ptr(), x.stride(0), m, p.k, p.w.data_ptr(),
       None if bias is None else bias.data_ptr(), p.n, y.data_ptr(), p.n,
       torch.get_num_threads())
    return y


def dense_packed(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """cpu_linear's signature (x, dense w, bias) through w's packed copy, taking any x F.linear
    takes: leading dimensions flattened, rows not laid out along k copied."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    with named_range("packed_linear"):   # bench/engine_step.py counts it a matmul
        y = packed_linear(rows, packed_of(w), bias)
    return y.view(*x.shape[:-1], y.shape[-1])
