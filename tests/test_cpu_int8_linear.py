"""The native int8 linear (drivers/cpu/int8_linear.c) against its definition computed with
PyTorch's integer matmul: the same bits, for every ISA path this CPU can run (AVX-512 VNNI,
AVX2, the scalar C), on odd shapes, strided rows and the edge rows (all zero, NaN)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.drivers.cpu import int8_linear as kernel
from llmasos.drivers.cpu.int8_linear import PackedInt8, int8_linear, pack, unpack
from llmasos.drivers.quant.cpu_int8 import quantize_weight

from conftest import ISA_FLAGS, typed_built_for


def reference(x: torch.Tensor, p: PackedInt8, inv: torch.Tensor | None,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's definition, op for op: s = round(v / max|v| * 127), exact integer sums,
    then (sum * col_scale) * max|v| (+ bias), each rounded to fp32 in that order."""
    v = x * inv if inv is not None else x
    a = v.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    s = torch.round(v / a * 127).clamp(-127, 127).to(torch.int64)
    acc = s @ unpack(p).to(torch.int64).T
    y = acc.to(torch.float32) * p.col_scale * a
    return y if bias is None else y + bias


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def isa_kernel(request: pytest.FixtureRequest) -> ctypes._CFuncPtr:
    return typed_built_for(kernel, request.param)


def make(n: int, k: int, seed: int) -> tuple[torch.Tensor, PackedInt8]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    return w, pack(*quantize_weight(w))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 70), k=st.integers(1, 300),
       pad=st.integers(0, 3), smooth=st.booleans(), with_bias=st.booleans(),
       seed=st.integers(0, 2**31))
def test_the_kernel_gives_its_definition_bit_for_bit(
        isa_kernel: ctypes._CFuncPtr, m: int, n: int, k: int, pad: int, smooth: bool,
        with_bias: bool, seed: int) -> None:
    """Shapes off every block (n not a multiple of 16, k not of 4, m past the row groups), rows
    with a stride, an outlier channel, an all-zero row."""
    g = torch.Generator().manual_seed(seed + 1)
    _, p = make(n, k, seed)
    x = (torch.randn(m, k + pad, generator=g) * torch.logspace(-3, 3, m)[:, None])[:, :k]
    x[:, 0] *= 40
    x[m // 2] = 0.0
    inv = torch.rand(k, generator=g) + 0.25 if smooth else None
    bias = torch.randn(n, generator=g) if with_bias else None
    assert torch.equal(int8_linear(x, p, inv, bias, isa_kernel), reference(x, p, inv, bias))


def test_the_threaded_path_gives_the_same_bits(isa_kernel: ctypes._CFuncPtr) -> None:
    """Past the cut where rows and weight blocks spread over the threads."""
    _, p = make(300, 1000, 7)
    x = torch.randn(70, 1000, generator=torch.Generator().manual_seed(8))
    y = int8_linear(x, p, None, None, isa_kernel)
    assert torch.equal(y, reference(x, p, None, None))
    assert torch.equal(int8_linear(x[33:34].clone(), p, None, None, isa_kernel), y[33:34])


def test_every_isa_adds_the_same_integers() -> None:
    """The paths this CPU runs agree with each other exactly (each equals the definition)."""
    _, p = make(200, 576, 3)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(4))
    outs = [int8_linear(x, p, None, None, typed_built_for(kernel, isa)) for isa in ISA_FLAGS]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_a_nan_row_stays_in_its_row() -> None:
    if kernel._kernel() is None:
        pytest.skip("no C compiler on this machine")
    _, p = make(40, 64, 5)
    x = torch.randn(3, 64)
    x[1, 9] = float("nan")
    y = int8_linear(x, p, None, None)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_pack_round_trips_and_keeps_the_symmetric_range() -> None:
    q = torch.randint(-128, 128, (37, 21), dtype=torch.int8)
    p = pack(q, torch.rand(37))
    assert torch.equal(unpack(p), q.clamp(min=-127))
    assert p.w.shape == (3, 6, 16, 4)
    assert p.nbytes == 3 * 6 * 64 + 37 * 4 * 3


def test_bad_rows_are_refused_with_the_shape_it_takes() -> None:
    if kernel._kernel() is None:
        pytest.skip("no C compiler on this machine")
    _, p = make(16, 32, 6)
    with pytest.raises(ValueError, match=r"fp32 rows \[m, 32\]"):
        int8_linear(torch.randn(2, 31), p, None, None)
    with pytest.raises(ValueError, match="fp32 rows"):
        int8_linear(torch.randn(2, 32, dtype=torch.float64), p, None, None)
    with pytest.raises(ValueError, match="fp32 rows"):
        int8_linear(torch.randn(32, 2).T, p, None, None)


def test_the_gated_rows_take_silu_gate_times_up(isa_kernel: ctypes._CFuncPtr) -> None:
    """gated: rows [gate | up] go in, silu(gate) * up is what the linear takes. The C's silu
    differs from F.silu's by an ulp or two (its own exp polynomial, ~1.5e-7 relative), which
    can move a quantized element by one step: against the definition on F.silu's product the
    result stays within a few of those steps, where the int8 rounding itself errs ~1%."""
    _, p = make(48, 200, 9)
    g = torch.Generator().manual_seed(10)
    gate_up = torch.randn(7, 400, generator=g) * 4
    gate_up[:, 3] = torch.tensor([-200.0, -90.0, -1e-30, 0.0, 1e-30, 90.0, 200.0])  # the tails
    inv = torch.rand(200, generator=g) + 0.25
    y = int8_linear(gate_up, p, inv, None, isa_kernel, gated=True)
    gate, up = gate_up.chunk(2, dim=-1)
    want = reference(torch.nn.functional.silu(gate) * up, p, inv, None)
    assert y.isfinite().all()
    assert ((y - want).pow(2).mean() / want.pow(2).mean()).sqrt() < 1e-3
    alone = int8_linear(gate_up[4:5].clone(), p, inv, None, isa_kernel, gated=True)
    assert torch.equal(alone, y[4:5])


def test_every_isa_forms_the_same_gated_rows() -> None:
    _, p = make(64, 300, 11)
    gate_up = torch.randn(5, 600, generator=torch.Generator().manual_seed(12)) * 3
    outs = [int8_linear(gate_up, p, None, None, typed_built_for(kernel, isa), gated=True)
            for isa in ISA_FLAGS]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_the_folded_rms_norm(isa_kernel: ctypes._CFuncPtr, with_delta: bool,
                             smooth: bool) -> None:
    """norm: the linear takes RMSNorm(x + delta), x += delta written back bit for bit. The
    rows quantize x * weight (* inv_smooth) whatever the norm's factor r, which only scales
    the row's result: r's sum of squares adds in the C's order, so y matches the definition
    to a few fp32 roundings (rtol 1e-6, ~8 eps), and a row is the same bits in any batch."""
    _, p = make(40, 96, 13)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 96, generator=g) * 3
    delta = torch.randn(6, 96, generator=g) if with_delta else None
    weight = torch.rand(96, generator=g) + 0.5
    inv = torch.rand(96, generator=g) + 0.25 if smooth else None
    added = x + delta if delta is not None else x.clone()
    mul = weight * inv if inv is not None else weight
    r = torch.rsqrt(added.pow(2).mean(dim=1, keepdim=True) + 1e-5)
    want = reference(added * mul, p, None, None) * r
    x_alone, delta_alone = x[2:3].clone(), None if delta is None else delta[2:3].clone()
    y = int8_linear(x, p, inv, None, isa_kernel, norm=kernel.Norm(weight, 1e-5, delta))
    assert torch.equal(x, added)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    alone = int8_linear(x_alone, p, inv, None, isa_kernel,
                        norm=kernel.Norm(weight, 1e-5, delta_alone))
    assert torch.equal(alone, y[2:3])
