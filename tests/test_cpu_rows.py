"""The native row kernels of the CPU step (drivers/cpu/): each against the PyTorch ops it
replaces, on random shapes, strided views and the edge rows (all zero, NaN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.drivers.cpu import rms_norm as rms_norm_module
from llmasos.drivers.cpu import rope_kv as rope_kv_module
from llmasos.drivers.cpu import row_scale as row_scale_module
from llmasos.drivers.cpu.rms_norm import add_rms_norm, rms_norm
from llmasos.drivers.cpu.rope_kv import rope_kv
from llmasos.drivers.cpu.row_scale import row_scale, torch_row_scale
from llmasos.drivers.model.attention import write_kv
from llmasos.drivers.model.llama import apply_rope

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


def native_rope_kv() -> None:
    if rope_kv_module._kernel() is None:
        pytest.skip("no C compiler on this machine: the PyTorch path serves")


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None].float() * inv[None]
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 80), kv_heads=st.integers(1, 4), gqa=st.integers(1, 4),
       head_dim=st.sampled_from([2, 16, 64, 80, 128]), half=st.booleans(),
       pad=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_rope_kv_gives_the_bits_of_apply_rope_then_write_kv(
        t: int, kv_heads: int, gqa: int, head_dim: int, half: bool, pad: int, seed: int) -> None:
    """The rotated rows and both pool layers, fp32 or fp16, bit for bit (past the threads' cut
    of 64 rows too), on QKV rows with padding between them."""
    native_rope_kv()
    g = torch.Generator().manual_seed(seed)
    q_heads, dtype = kv_heads * gqa, torch.float16 if half else torch.float32
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(t, width + pad, generator=g)[:, :width]
    rope = rope_tables(torch.randint(0, 4096, (t,), generator=g), head_dim)
    blocks, block_size = 8, 16
    slots = torch.randperm(blocks * block_size, generator=g)[:t]
    pool = torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    pools = [pool, pool.clone()]
    ref = qkv.clone()
    qk = ref[:, : (q_heads + kv_heads) * head_dim].view(t, q_heads + kv_heads, head_dim)
    qk = apply_rope(qk, *rope)
    v = ref[:, (q_heads + kv_heads) * head_dim:].view(t, kv_heads, head_dim)
    write_kv(pools[0][0], pools[0][1], qk[:, q_heads:], v, slots)
    assert rope_kv(qkv, rope, slots, pools[1][0], pools[1][1], q_heads)
    assert torch.equal(qkv[:, : (q_heads + kv_heads) * head_dim], qk.reshape(t, -1))
    assert torch.equal(pools[1], pools[0])


def test_rope_kv_refuses_a_slot_outside_the_pool_and_writes_nothing() -> None:
    native_rope_kv()
    qkv = torch.randn(3, (3 + 2) * 16)
    rope = rope_tables(torch.arange(3), 16)
    k_cache, v_cache = torch.zeros(4, 16, 1, 16), torch.zeros(4, 16, 1, 16)
    with pytest.raises(IndexError, match="outside the pool"):
        rope_kv(qkv, rope, torch.tensor([0, 64, 5]), k_cache, v_cache, 3)
    assert not k_cache.any() and not v_cache.any()


def test_rope_kv_leaves_partial_rotary_to_pytorch() -> None:
    """Tables narrower than a head (NeoX's partial rotary): no call, the caller's path."""
    qkv = torch.randn(2, 3 * 32)
    rope = rope_tables(torch.arange(2), 16)
    k_cache, v_cache = torch.zeros(2, 16, 1, 32), torch.zeros(2, 16, 1, 32)
    before = qkv.clone()
    assert not rope_kv(qkv, rope, torch.tensor([0, 1]), k_cache, v_cache, 1)
    assert torch.equal(qkv, before) and not k_cache.any()


def test_greedy_takes_the_first_maximum_and_its_logprob() -> None:
    """The native greedy rows against torch.max and log_softmax: the same token (ties go to the
    first), the log-probability within the sum's rounding (its exp polynomial errs ~1.5e-7
    relative, under the sqrt(V) ulps of any fp32 order), on strided rows."""
    from llmasos.drivers.cpu import greedy as greedy_module
    if greedy_module._kernel() is None:
        pytest.skip("no C compiler on this machine: the PyTorch path serves")
    g = torch.Generator().manual_seed(21)
    logits = (torch.randn(40, 49160, generator=g) * 4)[:, :49152]
    logits[3, 100] = logits[3, 200] = logits[3].max() + 1   # a tie: the first wins
    token, logprob = greedy_module.greedy(logits)
    top, want = logits.max(dim=-1)
    assert torch.equal(token, want) and token[3] == 100
    exact = torch.log_softmax(logits.double(), dim=-1).gather(1, want[:, None]).squeeze(1)
    lse = torch.logsumexp(logits.double(), dim=-1).abs().max().item()
    torch.testing.assert_close(logprob.double(), exact, rtol=0,
                               atol=(lse + 49152 ** 0.5) * EPS)


def test_greedy_edge_rows_match_pytorch() -> None:
    """NaN picks its first NaN with a NaN logprob; all -inf and +inf rows get NaN, as the
    PyTorch ops give; a row of one finite value among -inf is certain (logprob 0)."""
    from llmasos.drivers.cpu import greedy as greedy_module
    if greedy_module._kernel() is None:
        pytest.skip("no C compiler on this machine: the PyTorch path serves")
    rows = torch.full((4, 8), float("-inf"))
    rows[0, 2], rows[0, 5] = float("nan"), float("nan")
    rows[2, 1] = float("inf")
    rows[3, 6] = 1.5
    token, logprob = greedy_module.greedy(rows)
    assert token.tolist() == [2, 0, 1, 6]
    assert logprob[:3].isnan().all() and logprob[3] == 0.0
    top, want = rows.max(dim=-1)
    torch_lp = (rows - top[:, None]).exp().sum(dim=-1).log().neg()
    assert torch.equal(token, want) and torch_lp[:3].isnan().all()
