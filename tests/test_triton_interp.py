"""Runs test_triton_cases.py in Triton's interpreter, in a subprocess per kernel family.

@triton.jit reads TRITON_INTERPRET when a kernel module is imported, so the interpreter gets a
fresh process: the flag never reaches this one, whatever order pytest collects modules in.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("test_triton_cases.py")
FAMILIES = {
    "write_kv": "write_kv or backend",
    "decode": "decode_attention",
    "prefill": "prefill",
    "quant_matmul": "quant",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_in_interpreter(family):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LLMASOS_TRITON_DEVICE", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           str(CASES), "-k", FAMILIES[family]]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280,
                         cwd=CASES.parent.parent)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and "skipped" not in run.stdout.split("\n")[-2], tail


def test_interpreter_flag_did_not_leak_here():
    assert os.environ.get("TRITON_INTERPRET") != "1"
