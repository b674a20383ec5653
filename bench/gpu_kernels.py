"""GPU check and benchmark for the Triton kernels in drivers/cuda.

On a CUDA GPU: runs tests/test_triton_cases.py compiled for real (bf16 included), then
benchmarks, each figure beside its baseline from the same run:
  - paged decode attention: achieved HBM bandwidth, as a fraction of the device's peak, and
    time vs torch SDPA on the same shapes (SDPA gets contiguous K/V, no paging);
  - paged prefill attention vs causal SDPA;
  - int8 / int4 (g128) / Q8_0 / Q4_1 weight-only matmul vs bf16 torch.matmul at M = 1, 4, 16
    (GEMV) and M = 1024 (GEMM).
Targets (H100/H200): decode >= 70% of peak HBM bandwidth; int8 >= 1.6x, int4 >= 2.5x bf16 at M=1.
Without a GPU it says so and prints {"gpu": false, ...}, exit 0. --smoke runs every code path
on the CPU in Triton's interpreter with tiny shapes (no figures worth reading).
Ends with one line of JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
TESTS_TIMEOUT_S = 170  # leaves the benchmark its share of gpu_check.sh's 5 minutes
# peak HBM bandwidth, bytes/s, by device name (NVML's clock x bus width is a fallback)
PEAK_BW = {"GH200": 4.0e12, "H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
           "H100": 3.35e12, "H800": 3.35e12, "A100-SXM4-80GB": 2.039e12,
           "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12}


def peak_bandwidth(name: str) -> tuple[float, str]:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw, "table"
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM) * 1e6
        width = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return 2 * clock * width / 8, "nvml"
    except Exception:  # noqa: BLE001 - any NVML failure only loses the fraction
        return float("nan"), "unknown"


def timer(device: str):
    if device == "cuda":
        # do_bench flushes L2 before each call and times only the call; the CPU enqueues the
        # call while the flush runs, so launch overhead stays out of the figures
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    def cpu_time(fn) -> float:
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def run_tests() -> dict:
    env = {**os.environ, "LLMASOS_TRITON_DEVICE": "cuda"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
           str(ROOT / "tests" / "test_triton_cases.py")]
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT,
                             timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        print(e.stdout[-3000:] if isinstance(e.stdout, str) else "")
        return {"passed": False, "summary": f"timed out after {TESTS_TIMEOUT_S}s",
                "seconds": TESTS_TIMEOUT_S}
    print(run.stdout[-3000:], run.stderr[-1500:], sep="\n")
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    return {"passed": run.returncode == 0, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 1)}


def paged_pool(batch: int, ctx: int, kv_heads: int, dim: int, block: int, dtype, device):
    blocks_per_seq = -(-ctx // block)
    nblocks = batch * blocks_per_seq
    k_cache = torch.randn(nblocks, block, kv_heads, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(nblocks, device=device).to(torch.int32)
    tables = perm.reshape(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, Hkv, ctx, D] for SDPA, gathered once outside the timed region."""
    b = tables.shape[0]
    x = cache[tables.long()].reshape(b, -1, cache.shape[2], cache.shape[3])[:, :ctx]
    return x.transpose(1, 2).contiguous()


def sdpa(q, k, v, causal: bool):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), is_causal=causal)


def bench_decode(cases, dtype, device, timeit, peak: float) -> list[dict]:
    from llmasos.drivers.cuda.decode_attention import decode_attention

    out = []
    for batch, ctx, hq, hkv, dim in cases:
        k_cache, v_cache, tables = paged_pool(batch, ctx, hkv, dim, 16, dtype, device)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, hq, dim, dtype=dtype, device=device)
        scale = dim**-0.5
        ours = decode_attention(q, k_cache, v_cache, tables, lens, scale)
        k, v = contiguous_kv(k_cache, tables, ctx), contiguous_kv(v_cache, tables, ctx)
        q4 = q[:, :, None, :]
        base = sdpa(q4, k, v, False)[:, :, 0]
        err = (ours.float() - base.float()).abs().max().item()
        t_ours = timeit(partial(decode_attention, q, k_cache, v_cache, tables, lens, scale))
        t_sdpa = timeit(partial(sdpa, q4, k, v, False))
        nbytes = 2 * batch * ctx * hkv * dim * k_cache.element_size()
        row = {"batch": batch, "ctx": ctx, "heads": f"{hq}/{hkv}", "dim": dim,
               "us": round(t_ours * 1e6, 1), "sdpa_us": round(t_sdpa * 1e6, 1),
               "GBps": round(nbytes / t_ours / 1e9, 1),
               "sdpa_GBps": round(nbytes / t_sdpa / 1e9, 1),
               "frac_peak": round(nbytes / t_ours / peak, 3),
               "vs_sdpa": round(t_sdpa / t_ours, 2), "max_err_vs_sdpa": round(err, 5)}
        print("decode", row)
        out.append(row)
    return out


def bench_prefill(cases, dtype, device, timeit) -> list[dict]:
    from llmasos.drivers.cuda.prefill_attention import prefill_attention

    out = []
    for batch, ctx, hq, hkv, dim in cases:
        k_cache, v_cache, tables = paged_pool(batch, ctx, hkv, dim, 16, dtype, device)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * ctx
        q = torch.randn(batch * ctx, hq, dim, dtype=dtype, device=device)
        scale = dim**-0.5
        ours = prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale)
        k, v = contiguous_kv(k_cache, tables, ctx), contiguous_kv(v_cache, tables, ctx)
        qb = q.reshape(batch, ctx, hq, dim).transpose(1, 2).contiguous()
        base = sdpa(qb, k, v, True).transpose(1, 2).reshape(batch * ctx, hq, dim)
        err = (ours.float() - base.float()).abs().max().item()
        t_ours = timeit(partial(prefill_attention, q, k_cache, v_cache, tables, cu, lens, scale))
        t_sdpa = timeit(partial(sdpa, qb, k, v, True))
        flops = 4 * batch * hq * dim * ctx * ctx / 2  # causal: half the square
        row = {"batch": batch, "ctx": ctx, "heads": f"{hq}/{hkv}", "dim": dim,
               "us": round(t_ours * 1e6, 1), "sdpa_us": round(t_sdpa * 1e6, 1),
               "TFLOPs": round(flops / t_ours / 1e12, 1),
               "sdpa_TFLOPs": round(flops / t_sdpa / 1e12, 1),
               "vs_sdpa": round(t_sdpa / t_ours, 2), "max_err_vs_sdpa": round(err, 5)}
        print("prefill", row)
        out.append(row)
    return out


def bench_matmul(shapes, ms, device, timeit) -> list[dict]:
    from llmasos.drivers.cuda.quant import linear_ref, quantize
    from llmasos.drivers.cuda.quant_matmul import SMALL_CONFIG, quant_linear

    act = torch.bfloat16 if device == "cuda" else torch.float16  # interpreter: no bf16 dot
    out = []
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        w16 = w.to(act)
        quants = {f: quantize(w, f, 128) for f in ("int8", "int4", "q8_0", "q4_1")}
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=act)
            t_base = timeit(partial(torch.matmul, x, w16.T))
            row = {"n": n, "k": k, "m": m, "bf16_us": round(t_base * 1e6, 1)}
            for fmt, qw in quants.items():
                y = quant_linear(x, qw)
                want = linear_ref(x, qw).float()
                rel = ((y.float() - want).abs().max() / want.abs().max()).item()
                t = timeit(partial(quant_linear, x, qw))
                row[f"{fmt}_us"] = round(t * 1e6, 1)
                row[f"{fmt}_speedup"] = round(t_base / t, 2)
                row[f"{fmt}_rel_err"] = float(f"{rel:.2e}")
            if m == 1:  # the 16-row tl.dot path M = 2..16 takes, beside the GEMV M = 1 takes
                for fmt in ("int8", "int4"):
                    t = timeit(partial(quant_linear, x, quants[fmt], config=SMALL_CONFIG))
                    row[f"{fmt}_dotpath_speedup"] = round(t_base / t, 2)
            print("matmul", row)
            out.append(row)
    return out


def targets(decode: list[dict], matmul: list[dict]) -> dict:
    m1 = [r for r in matmul if r["m"] == 1]
    return {"decode_frac_peak_best": max(r["frac_peak"] for r in decode),
            "decode_ge_70pct": max(r["frac_peak"] for r in decode) >= 0.70,
            "int8_m1_speedup_min": min(r["int8_speedup"] for r in m1),
            "int8_ge_1.6x": min(r["int8_speedup"] for r in m1) >= 1.6,
            "int4_m1_speedup_min": min(r["int4_speedup"] for r in m1),
            "int4_ge_2.5x": min(r["int4_speedup"] for r in m1) >= 2.5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true", help="benchmark only")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU + TRITON_INTERPRET=1, tiny shapes: exercise every path")
    args = ap.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            os.execve(sys.executable, [sys.executable, *sys.argv],
                      {**os.environ, "TRITON_INTERPRET": "1"})
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("gpu_kernels: no CUDA GPU here; the kernels are checked on the CPU by "
              "tests/test_triton_interp.py and tests/test_triton_compile.py instead.")
        print(json.dumps({"gpu": False, "reason": "torch.cuda.is_available() is False"}))
        return 0

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    peak, peak_src = peak_bandwidth(name) if device == "cuda" else (1e11, "nominal")
    result = {"gpu": device == "cuda", "device": name, "peak_GBps": round(peak / 1e9),
              "peak_source": peak_src}
    print(f"gpu_kernels: {name}, peak HBM {peak / 1e9:.0f} GB/s ({peak_src})")
    if device == "cuda" and not args.skip_tests:
        result["tests"] = run_tests()
    timeit = timer(device)
    torch.manual_seed(0)
    if device == "cuda":
        dec_cases = [(1, 8192, 32, 8, 128), (16, 4096, 32, 8, 128), (64, 2048, 32, 8, 128),
                     (32, 4096, 9, 3, 64)]  # Llama-3-8B-like heads; the last is SmolLM2's
        pre_cases = [(1, 4096, 32, 8, 128), (8, 1024, 32, 8, 128)]
        mm_shapes, mm_ms = [(4096, 4096), (14336, 4096), (4096, 14336)], [1, 4, 16, 1024]
        dtype = torch.bfloat16
    else:
        dec_cases, pre_cases = [(2, 40, 6, 2, 64)], [(2, 40, 6, 2, 64)]
        mm_shapes, mm_ms, dtype = [(64, 256)], [1, 4, 16, 33], torch.float16
    result["decode"] = bench_decode(dec_cases, dtype, device, timeit, peak)
    result["prefill"] = bench_prefill(pre_cases, dtype, device, timeit)
    result["matmul"] = bench_matmul(mm_shapes, mm_ms, device, timeit)
    result["targets"] = targets(result["decode"], result["matmul"])
    print(json.dumps(result))
    return 0 if result.get("tests", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
