"""Load-time probes remembered on disk. A decision timed once (which matmul kernel is fastest
for these weights on this CPU: cpu_linear.probe) is reused by every later load: a restarted
service does not pay for it, and a busy machine's noisy timings cannot flip it from one restart
to the next.

The key holds all the answer depends on: torch's version, the CPU (model name, flags, the ISAs
torch, MKL and oneDNN dispatch to), torch's thread count and the weights' shapes and dtype. Any
change is a new key, timed afresh. The file is $XDG_CACHE_HOME/llmasos/probes.json:
rebuildable, deletable."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import structlog
import torch

from llmasos.drivers.loaders.cache import weights_cache_dir

log = structlog.get_logger()
# most decisions kept (the newest): a run of the test suite makes ~80, and a cap of 64 evicted
# the embedded model's (each re-timed, ~2 s, at its next load)
KEEP = 256
Answer = bool | str   # what a probe decides, as JSON keeps it
# settings that cap the ISA MKL and oneDNN dispatch to (torch's own is asked directly)
ISA_CAPS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def probes_path(weights_dir: str | None = None) -> Path:
    """Beside the weights cache (of $XDG_CACHE_HOME unless `weights_dir` is given)."""
    return Path(weights_dir or weights_cache_dir()).parent / "probes.json"


@cache
def cpu_signature() -> str:
    """A short hash of the CPU's model name and flags and the ISAs torch, MKL and oneDNN use."""
    lines = []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                lines.append(line.strip())
            elif not line.strip() and lines:
                break   # the first processor tells for all of them
    lines.append(torch.backends.cpu.get_cpu_capability())
    lines += [f"{v}={os.environ.get(v, '')}" for v in ISA_CAPS]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def probe_key(name: str, w: torch.Tensor) -> str:
    shape = "x".join(map(str, w.shape))
    return (f"{name}|torch {torch.__version__}|cpu {cpu_signature()}|"
            f"threads {torch.get_num_threads()}|{shape} {w.dtype} {w.device.type}")


def remembered(key: str, measure: Callable[[], Answer], path: Path | None = None) -> Answer:
    """The decision stored under key, or measure() stored under it."""
    path = path or probes_path()
    known = _read(path)
    if key in known:
        return known[key]
    answer = measure()
    known = {k: v for k, v in _read(path).items() if k != key}   # another process may have
    known[key] = answer                                          # written meanwhile
    _write(path, dict(list(known.items())[-KEEP:]))
    log.info("probe_measured", key=key, answer=answer)
    return answer


def linear_kernel(regime: str, weights: list[torch.Tensor], measure: Callable[[], str]) -> str:
    """cpu_linear.probe's hook: the kernel a regime's pass through these weights picked."""
    shapes = ",".join(sorted({"x".join(map(str, w.shape)) for w in weights[1:]}))
    return remembered(probe_key(f"pass/{regime}/{len(weights)}/{shapes}", weights[0]), measure)


def _read(path: Path) -> dict[str, Answer]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):   # none yet, or damaged: measured again and rewritten
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, known: dict[str, Answer]) -> None:
    """Atomically (a reader never sees half a file); a read-only cache only costs a re-probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("probe_not_saved", path=str(path), error=str(e))
