"""The native CPU decode attention (drivers/cpu/paged_decode.c): against a dense reference for
random pools, block tables, head sizes and GQA ratios; bit-exact batch invariance; the build's
fallback when there is no compiler; and the model using it (or not, on request) with the same
greedy tokens as the PyTorch path."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.drivers.cpu import build, paged_decode
from llmasos.drivers.cpu.paged_decode import PagedDecode, decode_kernel
from llmasos.drivers.model.attention import build_group, group_attention
from llmasos.services.inference.engine import Engine

from conftest import (
    ISA_FLAGS,
    converting_once,
    embedded_gguf,
    filled_pool,
    greedy_steps,
    shared_state,
    typed_built_for,
)

CPU = torch.device("cpu")
MAX_LEN = 300
EPS = torch.finfo(torch.float32).eps


def atol(head_dim: int, longest: int) -> float:
    """An output row is a softmax-weighted mean of <= longest values (|v| <~ 4 for randn): the
    q.k dot of head_dim terms feeding exp, the exp polynomial (~2 eps) and the weighted sum over
    the context round, in another order than SDPA's, to <= (D + L) eps * max|v| per side."""
    return 2 * (head_dim + longest + 2) * EPS * 4


def kernel() -> PagedDecode:
    k = decode_kernel(torch.float32, CPU, 64, 3)
    if k is None:
        pytest.skip("no C compiler on this machine: the PyTorch path serves (its own tests)")
    return k


def pool(seq_lens: list[int], block: int, kv_heads: int, head_dim: int, seed: int,
         kv: torch.dtype = torch.float32):
    return filled_pool(seq_lens, block, kv_heads, head_dim, torch.Generator().manual_seed(seed),
                       kv)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query q [Hq, D] over k, v [L, Hkv, D]: GQA attention to every key."""
    g = q.shape[0] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).transpose(0, 1)   # [Hq, L, D]
    vv = v.repeat_interleave(g, dim=1).transpose(0, 1)
    return F.scaled_dot_product_attention(q[:, None], kk, vv, scale=scale)[:, 0]


@settings(max_examples=40, deadline=None)
@given(seq_lens=st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=9),
       shape=st.sampled_from([(64, 3, 3), (128, 4, 2), (32, 1, 1), (64, 8, 1), (16, 2, 5)]),
       block=st.sampled_from([4, 16]), seed=st.integers(0, 10_000),
       kv=st.sampled_from([torch.float32, torch.float16]))
def test_decode_matches_dense(seq_lens: list[int], shape: tuple[int, int, int], block: int,
                              seed: int, kv: torch.dtype) -> None:
    """An fp16 pool (int8 recipes' half_kv) is widened on load: against the dense reference
    over the values it holds, the fp32 bound holds."""
    head_dim, gqa, kv_heads = shape
    fn = kernel()
    k_cache, v_cache, tables, ks, vs = pool(seq_lens, block, kv_heads, head_dim, seed, kv)
    q = torch.randn(len(seq_lens), kv_heads * gqa, head_dim,
                    generator=torch.Generator().manual_seed(seed + 1))
    scale = 1 / math.sqrt(head_dim)
    group = build_group(list(range(len(seq_lens))), [1] * len(seq_lens), seq_lens, tables,
                        block, gqa)
    out = fn(q, k_cache, v_cache, group, scale)
    ref = torch.stack([dense(q[i], ks[i], vs[i], scale) for i in range(len(seq_lens))])
    torch.testing.assert_close(out, ref, atol=atol(head_dim, max(seq_lens)), rtol=0)
    # and the PyTorch path it replaces (gather + SDPA) agrees within the same bound
    torch.testing.assert_close(out, group_attention(q, k_cache, v_cache, group, scale),
                               atol=atol(head_dim, max(seq_lens)), rtol=0)


def built_for(isa: str) -> PagedDecode:
    """paged_decode built for one ISA (the AVX2 one has its own loops; AVX-512 and x86-64
    build the generic vectors), as a machine of that kind builds it."""
    return PagedDecode(typed_built_for(paged_decode, isa))


@pytest.mark.parametrize("isa", list(ISA_FLAGS))
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_every_isa_build_matches_dense_alone_and_in_a_batch(isa: str, kv: torch.dtype) -> None:
    """Each code path this CPU can run (the AVX2 one has its own loops: 16 registers), over
    lengths around the 8-key groups and blocks, head sizes of 1 to 16 chunks and GQA 1 to 5."""
    fn = built_for(isa)
    lens = [1, 7, 8, 9, 15, 16, 17, 140, 299]
    for head_dim, gqa, kv_heads in [(64, 3, 3), (128, 4, 2), (16, 5, 2), (256, 1, 1)]:
        k_cache, v_cache, tables, ks, vs = pool(lens, 16, kv_heads, head_dim, seed=head_dim, kv=kv)
        q = torch.randn(len(lens), kv_heads * gqa, head_dim,
                        generator=torch.Generator().manual_seed(gqa))
        scale = 1 / math.sqrt(head_dim)
        out = fn(q, k_cache, v_cache, build_group(list(range(len(lens))), [1] * len(lens), lens,
                                                  tables, 16, gqa), scale)
        ref = torch.stack([dense(q[i], ks[i], vs[i], scale) for i in range(len(lens))])
        torch.testing.assert_close(out, ref, atol=atol(head_dim, max(lens)), rtol=0)
        alone = fn(q[-1:], k_cache, v_cache, build_group([0], [1], lens[-1:], [tables[-1]], 16,
                                                          gqa), scale)
        assert torch.equal(alone[0], out[-1]), (isa, head_dim, gqa)


@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_each_sequence_alone_and_in_any_batch_gives_the_same_bits(kv: torch.dtype) -> None:
    fn = kernel()
    lens = [1, 15, 16, 17, 140, 299, 33, 64]
    k_cache, v_cache, tables, _, _ = pool(lens, 16, 3, 64, seed=7, kv=kv)
    q = torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(8))
    batch = fn(q, k_cache, v_cache, build_group(list(range(len(lens))), [1] * len(lens), lens,
                                                tables, 16, 3), 0.125)
    for i, n in enumerate(lens):
        alone = fn(q[i:i + 1], k_cache, v_cache, build_group([0], [1], [n], [tables[i]], 16, 3),
                   0.125)
        assert torch.equal(alone[0], batch[i]), f"sequence {i} (length {n}) changed with its batch"
    # the rows of a wider flat batch (the model's q is a view with K and V heads beside it)
    wide = torch.zeros(len(lens), 9 + 6, 64)
    wide[:, :9] = q
    assert torch.equal(fn(wide[:, :9], k_cache, v_cache,
                          build_group(list(range(len(lens))), [1] * len(lens), lens, tables,
                                      16, 3), 0.125), batch)


def test_shapes_it_cannot_serve_keep_the_pytorch_path() -> None:
    assert not paged_decode.fits(torch.bfloat16, CPU, 64, 3)
    assert not paged_decode.fits(torch.float32, CPU, 72, 3)     # not a multiple of 16
    assert not paged_decode.fits(torch.float32, CPU, 512, 3)    # past 256
    assert not paged_decode.fits(torch.float32, CPU, 64, 32)    # past 16 query heads a KV head
    assert not paged_decode.fits(torch.float32, torch.device("cuda"), 64, 3)
    assert paged_decode.fits(torch.float32, CPU, 128, 8)


def test_blocks_of_other_sizes_take_the_pytorch_path_and_other_dtypes_are_refused() -> None:
    fn = kernel()
    lens = [5, 30]
    k_cache, v_cache, tables, ks, vs = pool(lens, 6, 3, 64, seed=2)   # 6: not a power of two
    q = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    group = build_group([0, 1], [1, 1], lens, tables, 6, 3)
    out = fn(q, k_cache, v_cache, group, 0.125)
    assert torch.equal(out, group_attention(q, k_cache, v_cache, group, 0.125))
    k16, v16, tables16, _, _ = pool(lens, 16, 3, 64, seed=2)
    with pytest.raises(TypeError, match="fp32 queries and an fp32 or fp16 pool"):
        fn(q.double(), k16.double(), v16.double(),
           build_group([0, 1], [1, 1], lens, tables16, 16, 3), 0.125)


def test_no_compiler_gives_none_and_a_warning_naming_the_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build.compiler() is None
    assert build.load_library.__wrapped__("paged_decode") is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


def test_a_compiler_that_fails_gives_none(monkeypatch, tmp_path) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build.load_library.__wrapped__("paged_decode") is None
    assert not any((tmp_path / "cache").rglob("*.so"))   # no half-built library left behind


def test_the_build_is_kept_per_source_compiler_and_cpu(monkeypatch, tmp_path) -> None:
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = build.load_library.__wrapped__("paged_decode")
    assert lib is not None
    built = list((tmp_path / "llmasos" / "native").glob("paged_decode-*.so"))
    assert [p.name for p in built] == [build.library_path("paged_decode",
                                                          build.compiler()).name]
    stamp = built[0].stat().st_mtime_ns
    assert build.load_library.__wrapped__("paged_decode") is not None
    assert built[0].stat().st_mtime_ns == stamp   # the second load reuses it


def test_an_aten_capped_at_avx2_builds_for_avx2() -> None:
    """Under `make test-avx2` the kernels take an AVX2-only machine's code paths, as ATen does;
    otherwise they are built for this CPU (an AVX2-only CPU's ATen says AVX2 itself)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86's instruction levels")
    code = ("import torch; from llmasos.drivers.cpu import build; "
            "print(torch.backends.cpu.get_cpu_capability(), *build.arch_flags())")
    capped = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    free = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    for env in (capped, free):
        cap, *flags = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                     text=True, timeout=120, check=True).stdout.split()
        want = ["-march=x86-64-v3", "-mtune=native"] if cap == "AVX2" else ["-march=native"]
        assert flags == want, (cap, flags)
    assert cap != "AVX2" or "avx512f" not in Path("/proc/cpuinfo").read_text()


@pytest.mark.slow
def test_the_model_decodes_with_it_and_gives_the_pytorch_paths_tokens(monkeypatch,
                                                                       tmp_path) -> None:
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (5, 40, 77, 100)]
    tokens = {}
    for mode in ("native", "sdpa"):
        monkeypatch.setenv(paged_decode.MODE_ENV, mode)
        engine = Engine(str(shared_state(tmp_path / mode)), kv_budget_bytes=32 << 20)
        with converting_once():
            engine.load("m", embedded_gguf(), quant="none")
        model = engine._models["m"].model
        assert (model.decode_kernel is not None) == (mode == "native")
        tokens[mode] = greedy_steps(engine, "m", prompts, 16)
        engine.unload("m")
    # fp32 attention summed in another order: equal greedy tokens, unless two logits tie
    # within ~1e-5 somewhere (none does for these prompts on the machines we run)
    same = sum(a == b for a, b in zip(tokens["native"], tokens["sdpa"], strict=True))
    assert same >= 3, tokens
