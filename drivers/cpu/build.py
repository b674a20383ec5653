"""Compile a C source of this folder into a shared library, once per source, compiler and CPU,
kept under $XDG_CACHE_HOME/llmasos/native (rebuildable, deletable). Built for this CPU
(-march=native, or AVX2's level where ATen is capped there: arch_flags), so the key holds the
flags and the CPU's model: a home shared by machines of two CPU families keeps one library for
each. No compiler, or a failed build, gives None and one
warning naming the fix; the caller then keeps its PyTorch path."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import structlog
import torch

from llmasos.drivers.loaders.cache import weights_cache_dir
from llmasos.drivers.model.probe_cache import cpu_signature

log = structlog.get_logger()
HERE = Path(__file__).resolve().parent
# -fopenmp links libgomp.so.1, the soname torch has loaded by then: one OpenMP runtime and one
# thread pool for torch's ops and these kernels, not two pools competing for the cores
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
COMPILER_ENV = "CC"


def arch_flags() -> tuple[str, ...]:
    """This CPU's instructions (-march=native), but AVX2's level on x86 where ATen was told to
    stop there (ATEN_CPU_CAPABILITY=avx2, as `make test-avx2` runs): the kernels then take the
    code paths of an AVX2-only machine, as the rest of the process does."""
    if platform.machine() in ("x86_64", "AMD64") and \
            torch.backends.cpu.get_cpu_capability() == "AVX2":
        return ("-march=x86-64-v3", "-mtune=native")
    return ("-march=native",)


def native_dir() -> Path:
    return Path(weights_cache_dir()).parent / "native"


def compiler() -> str | None:
    """$CC when set (and nothing else then), else cc or gcc on the PATH."""
    named = os.environ.get(COMPILER_ENV)
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def _version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else cc


def library_path(name: str, cc: str) -> Path:
    # the folder's headers with the source: a kernel that includes one rebuilds when it changes
    source = b"\0".join((HERE / f).read_bytes() for f in
                         (f"{name}.c", *sorted(p.name for p in HERE.glob("*.h"))))
    flags = " ".join((*FLAGS, *arch_flags()))
    key = hashlib.sha256(b"\0".join([source, _version(cc).encode(), flags.encode(),
                                     cpu_signature().encode()])).hexdigest()[:16]
    return native_dir() / f"{name}-{key}.so"


def compile_library(name: str, cc: str, target: Path) -> None:
    """Into a temporary file, then renamed: a concurrent build or load never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, *arch_flags(), "-o", tmp, str(HERE / f"{name}.c")], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def load_library(name: str) -> ctypes.CDLL | None:
    """drivers/cpu/{name}.c as a loaded library, built first if this machine has none yet."""
    cc = compiler()
    if cc is None:
        log.warning("native_kernel_unavailable", kernel=name,
                    why=f"no C compiler found ({os.environ.get(COMPILER_ENV) or 'cc, gcc'})",
                    fix="install gcc (Debian: apt-get install gcc) or set CC; the PyTorch "
                        "path serves meanwhile")
        return None
    try:
        path = library_path(name, cc)
        if not path.exists():
            compile_library(name, cc, path)
            log.info("native_kernel_built", kernel=name, path=str(path))
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        log.warning("native_kernel_unavailable", kernel=name, why=str(detail)[-400:],
                    fix=f"check that {cc} can build C with OpenMP (-fopenmp); the PyTorch "
                        "path serves meanwhile")
        return None


def native_function(name: str, argtypes: list, restype: object,
                    symbol: str = "") -> ctypes._CFuncPtr | None:
    """The function `symbol` (default `name`) of drivers/cpu/{name}.c, typed for ctypes, or None
    where the library cannot be built (its caller keeps its PyTorch path)."""
    lib = load_library(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol or name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn
