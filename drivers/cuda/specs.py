"""Every kernel variant the dispatch can launch, as ahead-of-time compile specs for sm_90.

Compiling these without a GPU (triton.compile on an ASTSource with GPUTarget("cuda", 90, 32))
catches what the interpreter cannot: tl.dot shapes, dtype rules, shared memory over the limit.
The constexprs come from the same *_meta/config functions the launchers use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmasos.drivers.cuda import decode_attention as dec
from llmasos.drivers.cuda import kv_write as kvw
from llmasos.drivers.cuda import prefill_attention as pre
from llmasos.drivers.cuda import quant_matmul as qmm
from llmasos.drivers.cuda.quant import QuantWeight

SM90 = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 232448  # the most shared memory one block may opt into on H100/H200
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_ARGS = {"qk_scale"}
# (block_size, kv_heads, group, head_dim): SmolLM2; GQA 8 at head dim 128 (Llama-3-8B-like).
# GROUP only changes address arithmetic; ratios 1/3/8 all run in the interpreter tests.
MODEL_SHAPES = ((16, 3, 3, 64), (16, 8, 8, 128))
MATMUL_MS = (1, 16, 64, 1024)  # one M per config choose_config can return


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: triton.runtime.JITFunction
    pointers: dict[str, str]
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    ints: dict[str, str] = field(default_factory=dict)

    def source(self) -> ASTSource:
        sig: dict[str, str] = {}
        for name in self.fn.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = self.pointers[name]
            else:
                sig[name] = "fp32" if name in FLOAT_ARGS else self.ints.get(name, "i32")
        ptrs = [i for i, n in enumerate(self.fn.arg_names) if n in self.pointers]
        attrs = {(i,): [["tt.divisibility", 16]] for i in ptrs}
        return ASTSource(fn=self.fn, signature=sig, constexprs=self.constexprs, attrs=attrs)


def compile_spec(spec: KernelSpec, target: GPUTarget = SM90) -> triton.compiler.CompiledKernel:
    return triton.compile(spec.source(), target=target,
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _attention_specs(dtype: torch.dtype) -> Iterator[KernelSpec]:
    t = "*" + TRITON_TYPE[dtype]
    for bs, kvh, group, hd in MODEL_SHAPES:
        tag = f"{TRITON_TYPE[dtype]}-g{group}-d{hd}"
        yield KernelSpec(f"write_kv-{tag}", kvw._write_kv_kernel,
                         dict(k_ptr=t, v_ptr=t, k_cache_ptr=t, v_cache_ptr=t, slot_ptr="*i64"),
                         kvw.write_kv_meta(bs, kvh, hd), num_warps=4)
        yield KernelSpec(f"decode1-{tag}", dec._decode_stage1,
                         dict(q_ptr=t, k_ptr=t, v_ptr=t, bt_ptr="*i32", lens_ptr="*i32",
                              part_ptr="*fp32", lse_ptr="*fp32"),
                         dec.stage1_meta(bs, group, hd, dtype))
        for splits in (1, 64):
            yield KernelSpec(f"decode2-{tag}-s{splits}", dec._decode_stage2,
                             dict(part_ptr="*fp32", lse_ptr="*fp32", o_ptr=t),
                             dec.stage2_meta(hd, splits), num_warps=2)
        for seqs in (1, 256) if dtype == torch.float16 else (1,):  # BLOCK_S: the tile search
            yield KernelSpec(f"prefill-{tag}-s{seqs}", pre._prefill_kernel,
                             dict(q_ptr=t, k_ptr=t, v_ptr=t, o_ptr=t, bt_ptr="*i32",
                                  cu_ptr="*i32", lens_ptr="*i32"),
                             pre.prefill_meta(bs, group, hd, seqs, dtype))


def _matmul_specs(dtype: torch.dtype) -> Iterator[KernelSpec]:
    t = "*" + TRITON_TYPE[dtype]
    weights = [("int8", 0, "*i8", "*fp32"), ("q8_0", 0, "*u8", "*u8"), ("q4_1", 0, "*u8", "*u8")]
    weights += [("int4", g, "*u8", "*fp16") for g in (32, 64, 128)]
    for fmt, group, wt, st in weights:
        qw = QuantWeight(fmt, 0, 0, torch.empty(0), group_size=group)
        for cfg in dict.fromkeys(qmm.choose_config(m, dtype) for m in MATMUL_MS):
            small = cfg.block_m <= qmm.SMALL_M
            fn = qmm._qgemv_kernel if cfg.block_m == 1 else qmm._qmm_kernel
            for out in dict.fromkeys([t, "*fp32"] if small else [t]):  # split-K: fp32 partials
                yield KernelSpec(
                    f"qmm-{fmt}{group or ''}-{TRITON_TYPE[dtype]}-bm{cfg.block_m}-{out[1:]}",
                    fn, dict(x_ptr=t, w_ptr=wt, s_ptr=st, z_ptr=st, y_ptr=out),
                    qmm.kernel_meta(qw, cfg, dtype), cfg.num_warps, cfg.num_stages)


def all_specs() -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for dtype in DTYPES:
        specs += list(_attention_specs(dtype)) + list(_matmul_specs(dtype))
    return specs
