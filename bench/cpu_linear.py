"""The CPU's fp32 matmul kernels side by side on the embedded SmolLM2's own weights: one pass
through every dense weight of a decode step (the forward's order, the LM head last), as the
load-time probe times it (drivers/model/cpu_linear.py), at each row count from one decode row
to a prefill chunk. Candidates take turns within each repetition (a busy moment hits all alike),
the best of the repetitions is kept. The anchor is the fastest of the libraries torch ships
(MKL's F.linear, MKL on the transposed product, oneDNN): what the engine ran before the packed
kernel, and what a PyTorch user gets at best. Prints a table, the CPU's features, then one JSON
line ("ratio_packed_vs_best_library" per row count, "min_ratio").

    .venv/bin/python bench/cpu_linear.py [--rows 1,2,4,8,16,32,64,128] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from llmasos.drivers.cpu.packed_linear import packed_of
from llmasos.drivers.model.cpu_linear import KERNELS, pass_time, usable
from llmasos.services.inference.engine import Engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import cpu_features, embedded_gguf  # noqa: E402

LIBRARIES = ("mkl", "mkl_transposed", "onednn")


def model_weights() -> list[torch.Tensor]:
    """The embedded model's dense weights in the forward's order, the LM head last."""
    engine = Engine(tempfile.mkdtemp(prefix="llmasos-bench-"), kv_budget_bytes=16 << 20)
    engine.load("m", embedded_gguf())
    model = engine._get("m").model
    dense = [w for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return [*dense, model.lm_head]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    weights = model_weights()
    for w in weights:
        packed_of(w)   # the copies the engine makes at load, outside the clock
    names = [n for n in (*LIBRARIES, "packed") if usable(n, weights)]
    figures: dict[str, dict[str, float]] = {}
    print(f"one pass through {len(weights)} weights "
          f"({sum(w.numel() for w in weights) / 1e6:.1f} M fp32 parameters), ms, best of "
          f"{args.reps}; {torch.get_num_threads()} threads")
    print(f"{'rows':>5} " + " ".join(f"{n:>15}" for n in names) + "   packed vs best library")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
        best = dict.fromkeys(names, float("inf"))
        for name in names:   # warm-up: oneDNN builds its primitives, MKL its buffers
            pass_time(KERNELS[name], xs, weights)
        for _ in range(args.reps):
            for name in names:
                best[name] = min(best[name], pass_time(KERNELS[name], xs, weights))
        library = min((n for n in names if n in LIBRARIES), key=best.get)
        ratio = best[library] / best["packed"] if "packed" in best else 0.0
        figures[str(rows)] = {**{f"{n}_ms": round(best[n] * 1e3, 2) for n in names},
                              "best_library": library, "ratio_packed_vs_best_library":
                              round(ratio, 3)}
        print(f"{rows:>5} " + " ".join(f"{best[n] * 1e3:>15.1f}" for n in names)
              + f"   {ratio:.2f}x ({library})", flush=True)
    ratios = [f["ratio_packed_vs_best_library"] for f in figures.values()]
    print(f"cpu: {cpu_features()}")
    print(json.dumps({"cpu": cpu_features(), "threads": torch.get_num_threads(),
                      "rows": figures, "min_ratio": min(ratios), "max_ratio": max(ratios)}))


if __name__ == "__main__":
    main()
