"""The fp32 linear on panel-packed weights (drivers/cpu/packed_linear.c), built for each x86
level: x @ w.T + bias within the bound of an fp32 sum of k terms in any order, each row's result
the same bits alone as in any batch, and the probe keeping its copies only where it picks it."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.drivers.cpu import packed_linear as kernel
from llmasos.drivers.cpu.packed_linear import ATTRIBUTE, pack, packed_linear, unpack
from llmasos.drivers.model import cpu_linear

from conftest import ISA_FLAGS, needs_isa_builds, typed_built_for, within_fp32_sums

# each ISA's build, and AVX-512's tiles (12 rows of 16-lane sums) built for AVX2: the tile code
# a Xeon runs, checked on a CPU without AVX-512 too
BUILDS = {**{isa: (isa, ()) for isa in ISA_FLAGS},
          "avx512_tiles": ("avx2", ("-DPACKED_LAYOUT=512",))}


@pytest.fixture(scope="module", params=list(BUILDS))
def isa_kernel(request: pytest.FixtureRequest) -> ctypes._CFuncPtr:
    isa, extra = BUILDS[request.param]
    return typed_built_for(kernel, isa, extra)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 70), k=st.integers(1, 300),
       pad=st.integers(0, 5), with_bias=st.booleans(), seed=st.integers(0, 1000))
def test_the_kernel_is_x_times_w_transposed(isa_kernel: ctypes._CFuncPtr, m: int, n: int,
                                            k: int, pad: int, with_bias: bool,
                                            seed: int) -> None:
    """Any rows (tiles of each ISA's height and a remainder), any channels (a short last
    panel), rows further apart than k (a view of wider rows), with and without a bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k + pad, generator=g)[:, :k]
    bias = torch.randn(n, generator=g) if with_bias else None
    y = packed_linear(x, pack(w), bias, isa_kernel)
    assert y.shape == (m, n) and y.dtype == torch.float32 and y.is_contiguous()
    assert within_fp32_sums(y, x, w, bias)


def test_every_tile_height_of_every_build(isa_kernel: ctypes._CFuncPtr) -> None:
    """Row counts 1 to 25 take every tile height each build has (3, 6 or 12 rows at most) and
    splits into several tiles: each a case of the kernel's own, not left to a random draw."""
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(40, 33, generator=g), torch.randn(40, generator=g)
    p = pack(w)
    for m in range(1, 26):
        x = torch.randn(m, 33, generator=g)
        assert within_fp32_sums(packed_linear(x, p, bias, isa_kernel), x, w, bias), m


def test_a_row_gives_the_same_bits_alone_as_in_any_batch(isa_kernel: ctypes._CFuncPtr) -> None:
    """Each row sums over k in one order whatever rows come with it: a sequence's logits do not
    depend on its batch. Large enough for the threaded path (panels split across threads)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(200, 576, generator=g), torch.randn(40, 576, generator=g)
    p = pack(w)
    whole = packed_linear(x, p, None, isa_kernel)
    for rows in (slice(0, 1), slice(7, 8), slice(3, 16), slice(13, 40)):
        assert torch.equal(packed_linear(x[rows], p, None, isa_kernel), whole[rows])


@pytest.mark.parametrize("n,k", [(37, 11), (16, 3), (1, 5), (3072, 576)])
def test_pack_is_the_panel_layout_and_round_trips(n: int, k: int) -> None:
    """The native packer (a model's weights at load) writes exactly [n/16, k, 16] of w, zero
    channels past n; unpack gives w back."""
    w = torch.randn(n, k)
    p = pack(w)
    padded = torch.cat([w, torch.zeros(-n % 16, k)])
    assert p.w.shape == (-(-n // 16), k, 16) and (p.n, p.k) == (n, k)
    assert torch.equal(p.w, padded.view(-1, 16, k).transpose(1, 2))
    assert torch.equal(unpack(p), w)


def test_the_probe_candidate_takes_what_f_linear_takes() -> None:
    """As a cpu_linear kernel it serves any x F.linear would: batched dims, columns along k."""
    needs_isa_builds()
    w, bias = torch.randn(40, 24), torch.randn(40)
    for x in (torch.randn(3, 5, 24), torch.randn(24, 7).t(), torch.randn(9, 48)[:, ::2]):
        y = kernel.dense_packed(x, w, bias)
        assert y.shape == (*x.shape[:-1], 40)
        flat = x.reshape(-1, 24)
        assert within_fp32_sums(y.reshape(-1, 40), flat, w, bias)


def test_bad_input_is_refused_with_what_it_takes() -> None:
    p = pack(torch.randn(8, 12))
    with pytest.raises(ValueError, match=r"rows \[m, 12\]"):
        packed_linear(torch.randn(2, 13), p)
    with pytest.raises(ValueError, match=r"rows \[m, 12\]"):
        packed_linear(torch.randn(12, 2).t(), p)   # columns, not rows, along k
    with pytest.raises(ValueError, match=r"rows \[m, 12\]"):
        packed_linear(torch.randn(2, 12, dtype=torch.float64), p)
    with pytest.raises(ValueError, match=r"bias is fp32 \[8\]"):
        packed_linear(torch.randn(2, 12), p, torch.randn(9))


def test_the_probe_keeps_the_copies_only_where_it_picks_the_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe packs every weight to time the kernel; when another wins every regime the
    copies go (they would double the weights' memory for nothing)."""
    needs_isa_builds()
    weights = [torch.randn(64, 32), torch.randn(48, 64)]
    monkeypatch.setattr(cpu_linear, "pass_time", lambda fn, xs, ws: (
        1.0 if fn is cpu_linear.KERNELS["packed"] else 2.0))
    plan = cpu_linear.probe(weights, weights[:1], torch.device("cpu"))
    assert (plan.row, plan.few, plan.many) == ("packed",) * 3
    assert all(hasattr(w, ATTRIBUTE) for w in weights)
    monkeypatch.setattr(cpu_linear, "pass_time", lambda fn, xs, ws: (
        2.0 if fn is cpu_linear.KERNELS["packed"] else 1.0))
    plan = cpu_linear.probe(weights, weights[:1], torch.device("cpu"))
    assert "packed" not in (plan.row, plan.few, plan.many)
    assert not any(hasattr(w, ATTRIBUTE) for w in weights)
