"""Every kernel variant the dispatch can launch compiles for sm_90 without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) runs the whole pipeline down
to a cubin (ptxas included), so dot shapes, dtypes and shared memory a Hopper GPU would reject
fail here, in CI, on the CPU. Also: importing and dispatching touches no GPU driver.
"""

import os
import subprocess
import sys

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("@triton.jit gives interpreter functions under TRITON_INTERPRET=1",
                allow_module_level=True)

import torch  # noqa: E402
import triton  # noqa: E402

from llmasos.drivers.cuda import decode_attention as dec  # noqa: E402
from llmasos.drivers.cuda.backend import kernels_for  # noqa: E402
from llmasos.drivers.cuda.quant_matmul import choose_config  # noqa: E402
from llmasos.drivers.cuda.specs import (  # noqa: E402
    DTYPES,
    MATMUL_MS,
    SM90_SHARED_BYTES,
    KernelSpec,
    all_specs,
    compile_spec,
)

SPECS = all_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_for_sm90(spec):
    kernel = compile_spec(spec)
    assert len(kernel.asm["cubin"]) > 0 and ".target sm_90" in kernel.asm["ptx"]
    assert kernel.metadata.num_warps == spec.num_warps
    assert kernel.metadata.shared <= SM90_SHARED_BYTES, kernel.metadata.shared


def test_specs_cover_every_matmul_config_the_dispatch_picks():
    names = {s.name for s in SPECS}
    assert len(names) == len(SPECS)
    for dtype in DTYPES:
        picked = {choose_config(m, dtype) for m in (1, 2, 4, 16, 17, 64, 65, 1024, 8192)}
        compiled = {choose_config(m, dtype) for m in MATMUL_MS}
        assert picked == compiled


def test_a_shape_the_gpu_rejects_fails_here():
    # 8 keys per tile: p @ v is a tl.dot with K = 8, which the interpreter runs and sm_90 rejects
    meta = dec.stage1_meta(16, 8, 64, torch.float16) | {"BLOCK_N": 8}
    spec = KernelSpec("bad", dec._decode_stage1,
                      dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", bt_ptr="*i32",
                           lens_ptr="*i32", part_ptr="*fp32", lse_ptr="*fp32"), meta)
    with pytest.raises(Exception, match="K >= 16"):
        compile_spec(spec)


def test_no_gpu_driver_is_touched_on_cpu():
    assert kernels_for("cpu") is None  # no interpreter here: the PyTorch path
    assert not torch.cuda.is_initialized()
    assert triton.__version__ == "3.6.0"


def test_backend_imports_triton_lazily():
    code = ("import sys, llmasos.drivers.cuda.backend as b, llmasos.drivers.cuda.quant; "
            "assert 'triton' not in sys.modules; assert b.kernels_for('cpu') is None")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
