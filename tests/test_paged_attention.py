"""Paged attention (write_kv, decode_attention, prefill_attention) against a dense reference,
for random block tables, lengths and chunk sizes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.drivers.model.attention import (
    decode_attention,
    prefill_attention,
    write_kv,
)

from conftest import filled_pool

BLOCK, HKV, HQ, D = 4, 2, 6, 16
SCALE = 1 / math.sqrt(D)
MAX_LEN = 40
# An output row is a softmax-weighted mean of <= MAX_LEN values (|v| <~ 4 for randn): the q.k dot
# of D terms feeding exp plus the weighted sum over L rounds to <= (D + L) eps * max|v| per side.
ATOL = 2 * (D + MAX_LEN) * torch.finfo(torch.float32).eps * 4   # 5.3e-5; seen: 7e-7


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q [n, Hq, D] at positions first_pos.., k/v [L, Hkv, D]: causal GQA attention."""
    g = HQ // HKV
    kk = k.repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, L, D]
    vv = v.repeat_interleave(g, dim=1).transpose(0, 1)
    pos = torch.arange(first_pos, first_pos + q.shape[0])
    mask = torch.arange(k.shape[0])[None] <= pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask, scale=SCALE)
    return out.transpose(0, 1)


def setup(seq_lens: list[int], q_lens: list[int], seed: int):
    """A pool with random garbage, each sequence's K/V written through write_kv at the slots of
    a random (shuffled, non-contiguous) block table."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, ks, vs = filled_pool(seq_lens, BLOCK, HKV, D, gen)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(sum(q_lens), HQ, D, generator=gen)
    return k_cache, v_cache, bt, ks, vs, q


@settings(max_examples=40, deadline=None)
@given(seq_lens=st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_decode_matches_dense(seq_lens: list[int], seed: int) -> None:
    k_cache, v_cache, bt, ks, vs, q = setup(seq_lens, [1] * len(seq_lens), seed)
    out = decode_attention(q, k_cache, v_cache, bt, torch.tensor(seq_lens, dtype=torch.int32),
                           SCALE)
    for s, n in enumerate(seq_lens):
        ref = dense(q[s:s + 1], ks[s], vs[s], n - 1)
        torch.testing.assert_close(out[s:s + 1], ref, atol=ATOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), seed=st.integers(0, 99))
def test_prefill_matches_dense(data: st.DataObject, seed: int) -> None:
    seq_lens = data.draw(st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=5))
    q_lens = [data.draw(st.integers(1, n)) for n in seq_lens]  # chunk = the last q_len tokens
    k_cache, v_cache, bt, ks, vs, q = setup(seq_lens, q_lens, seed)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = prefill_attention(q, k_cache, v_cache, bt, cu,
                            torch.tensor(seq_lens, dtype=torch.int32), SCALE)
    for s, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        a, b = int(cu[s]), int(cu[s + 1])
        torch.testing.assert_close(out[a:b], dense(q[a:b], ks[s], vs[s], n - ql),
                                   atol=ATOL, rtol=0)


def test_write_kv_lands_in_slots() -> None:
    k_cache = torch.zeros(3, BLOCK, HKV, D)
    v_cache = torch.zeros(3, BLOCK, HKV, D)
    k, v = torch.randn(2, HKV, D), torch.randn(2, HKV, D)
    write_kv(k_cache, v_cache, k, v, torch.tensor([2 * BLOCK + 1, 3]))
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(k_cache[0, 3], k[1])
    assert torch.equal(v_cache[2, 1], v[0]) and torch.equal(v_cache[0, 3], v[1])
    assert k_cache[1].abs().sum() == 0
