"""The native row kernels of the CPU step (drivers/cpu/): each against the PyTorch ops it
replaces, on random shapes, strided views and the edge rows (all zero, NaN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.drivers.cpu import rms_norm as rms_norm_module
from llmasos.drivers.cpu import row_scale as row_scale_module
from llmasos.drivers.cpu.rms_norm import add_rms_norm, rms_norm
from llmasos.drivers.cpu.row_scale import row_scale, torch_row_scale

EPS = torch.finfo(torch.float32).eps


def native_row_scale() -> None:
    if row_scale_module._kernel() is None:
        pytest.skip("no C compiler on this machine: the PyTorch path serves")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 200), k=st.integers(1, 700), pad=st.integers(0, 5),
       smooth=st.booleans(), seed=st.integers(0, 2**31))
def test_row_scale_is_bit_identical_to_the_pytorch_ops(rows: int, k: int, pad: int,
                                                       smooth: bool, seed: int) -> None:
    """A product, an exact maximum and a true division round alike in any order: the same
    bits, on row views with padding between rows and past the threads' 64K-element cut."""
    native_row_scale()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k + pad, generator=g) * torch.rand(rows, 1, generator=g) * 50)[:, :k]
    x[0] = 0.0   # an all-zero row divides by the 1e-30 floor
    inv = torch.rand(k, generator=g) + 0.25 if smooth else None
    got, want = row_scale(x, inv), torch_row_scale(x, inv)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0][0], torch.zeros(k))


def test_row_scale_keeps_nan_to_its_row() -> None:
    native_row_scale()
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    rows, amax = row_scale(x, None)
    assert amax[1].isnan().all() and rows[1].isnan().all()
    assert torch.equal(rows[[0, 2]], torch_row_scale(x[[0, 2]], None)[0])


def test_row_scale_leaves_its_input_alone() -> None:
    native_row_scale()
    x = torch.randn(4, 32)
    before = x.clone()
    row_scale(x, torch.full((32,), 0.5))
    assert torch.equal(x, before)


def native_rms_norm() -> None:
    if rms_norm_module._kernel() is None:
        pytest.skip("no C compiler on this machine: the PyTorch path serves")


def norm_rtol(k: int) -> float:
    """k squares summed in fp32 in another order than ATen's differ by <= k eps relative; the
    square root halves that; the scale and two products add 3 eps."""
    return (k / 2 + 3) * EPS


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), k=st.integers(1, 700), pad=st.integers(0, 5),
       seed=st.integers(0, 2**31))
def test_rms_norm_matches_pytorch_and_adds_the_residual(rows: int, k: int, pad: int,
                                                       seed: int) -> None:
    native_rms_norm()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k + pad, generator=g) * 3)[:, :k]
    delta = torch.randn(rows, k, generator=g)
    w = torch.rand(k, generator=g) + 0.5
    want = F.rms_norm(x, (k,), w, 1e-5)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), want, rtol=norm_rtol(k), atol=1e-30)
    summed = x + delta
    got = add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(x, summed)   # the residual stream updated in place, as add_ would
    torch.testing.assert_close(got, F.rms_norm(summed, (k,), w, 1e-5), rtol=norm_rtol(k),
                               atol=1e-30)


def test_rms_norm_rows_are_the_same_in_any_batch() -> None:
    """Each row alone, bit for bit, also in a batch large enough to split across threads."""
    native_rms_norm()
    x, w = torch.randn(256, 576), torch.rand(576)
    batch = rms_norm(x, w, 1e-6)
    for r in (0, 127, 255):
        assert torch.equal(rms_norm(x[r:r + 1], w, 1e-6)[0], batch[r])


def test_rms_norm_falls_back_off_its_path() -> None:
    """Rows of another dtype or rank take F.rms_norm as they are."""
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    w = torch.rand(16, dtype=torch.float64)
    assert torch.equal(rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))
