"""Runs test_triton_cases.py in Triton's interpreter, in one subprocess per kernel family.

@triton.jit reads TRITON_INTERPRET when a kernel module is imported, so the interpreter gets a
fresh process: the flag never reaches this one, whatever order pytest collects modules in.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("test_triton_cases.py")
FAMILIES = {
    "write_kv": "write_kv or backend",
    "decode": "decode_attention",
    "prefill": "prefill or engine",
    "quant_matmul": "quant",
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.Popen]:
    """All families start at once (the interpreter is single-threaded; the cores are not)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LLMASOS_TRITON_DEVICE", None)
    procs = {}
    for family, select in FAMILIES.items():
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES),
               "-k", select]
        procs[family] = subprocess.Popen(cmd, env=env, cwd=CASES.parent.parent, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_in_interpreter(runs, family):
    out, _ = runs[family].communicate(timeout=280)
    assert runs[family].returncode == 0, out[-8000:]
    last = out.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "deselected" in last, out[-8000:]


def test_interpreter_flag_did_not_leak_here():
    assert os.environ.get("TRITON_INTERPRET") != "1"


def test_every_case_belongs_to_a_family():
    tree = ast.parse(CASES.read_text())
    names = [f.name for f in tree.body if isinstance(f, ast.FunctionDef)
             and f.name.startswith("test_")]
    words = [w for expr in FAMILIES.values() for w in expr.split(" or ")]
    assert len(names) > 10
    assert [n for n in names if not any(w in n for w in words)] == []
