#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels (issue 6), under 5 minutes on an H100/H200:
# bench/gpu_kernels.py runs tests/test_triton_cases.py on the GPU (bf16 included, compiled for
# real, capped at 170 s), then benchmarks decode/prefill attention vs SDPA and the quantized
# matmuls vs bf16 torch.matmul. Exits 0 with {"gpu": false} where there is no GPU.
# The last line is the benchmark's JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.cuda.is_available())' >&2
exec timeout 290 "$PY" bench/gpu_kernels.py "$@"
