"""llmosd: the LLMasOS kernel daemon.

  llmosd run [--listen ADDR] [--home DIR] [--config FILE] [--policy P] [--no-embedded] ...
  llmosd adduser NAME [--cap CAP ...]      prints the new user's token once
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import structlog

from llmasos.kernel import config, log
from llmasos.kernel.executor import Executor
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.server import build

logger = structlog.get_logger()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llmosd", description="the LLMasOS kernel daemon")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot the kernel and its services in the foreground")
    run.add_argument("--listen", help="address to serve syscalls on (default 127.0.0.1:7070)")
    run.add_argument("--home", help="state directory (default $LLMASOS_HOME or "
                     "~/.local/state/llmasos)")
    run.add_argument("--config", help="TOML file of settings (default HOME/llmosd.toml)")
    run.add_argument("--policy", choices=["fcfs", "priority", "fair"])
    run.add_argument("--grace", type=float, help="seconds running jobs get at shutdown")
    run.add_argument("--no-embedded", dest="embedded", action="store_false", default=None,
                     help="do not deploy the embedded SmolLM2 model at boot")
    run.add_argument("--kv-budget-mb", dest="kv_budget_mb", type=int)
    run.add_argument("--device", choices=["cpu", "cuda"])
    run.add_argument("--quant", help="default quantization recipe for Deploy and the embedded "
                     "model: none, int8 or a recipe from `llmsh models --formats`")
    run.add_argument("--zombie-ttl", dest="zombie_ttl", type=float)
    run.add_argument("--restart-max", dest="restart_max", type=int)
    run.add_argument("--restart-window", dest="restart_window", type=float)
    run.add_argument("--token-budget", dest="token_budget", type=int,
                     help="most tokens in one step")
    run.add_argument("--max-batch", dest="max_batch", type=int, help="most jobs in one step")
    add = sub.add_parser("adduser", help="create a user and print its token once")
    add.add_argument("name")
    add.add_argument("--home")
    add.add_argument("--cap", action="append", default=[], help="capability (repeatable)")
    return ap.parse_args(argv)


def adduser(args: argparse.Namespace) -> int:
    """The security service owns the user store; its CLI edits it under a file lock."""
    home = args.home or config.default_home()
    cmd = [sys.executable, "-m", "llmasos.services.security", "adduser", args.name,
           "--state-dir", home] + [x for c in args.cap for x in ("--cap", c)]
    return subprocess.call(cmd)


def run(args: argparse.Namespace) -> int:
    log.configure()
    cfg = config.load(args)
    os.makedirs(cfg.home, mode=0o700, exist_ok=True)
    k = Kernel(cfg)
    k.executor = Executor(k)
    server, port = build(k, cfg.listen)
    address = f"{cfg.listen.rsplit(':', 1)[0]}:{port}"
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        k.supervisor.stopping.set()   # a boot in progress gives up at once

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    logger.info("booting", address=address, home=cfg.home, policy=cfg.policy)
    k.supervisor.start()
    healthy = k.supervisor.wait_healthy(cfg.boot_timeout)
    if stop.is_set() or not healthy:
        if not stop.is_set():
            logger.error("boot_failed", services={n: s.state for n, s in
                                                  k.supervisor.services.items()})
        k.supervisor.stop()
        return 0 if stop.is_set() else 1
    k.executor.start()
    server.start()
    print(f"llmosd ready {address}", flush=True)
    logger.info("ready", address=address, models=sorted(k.models))
    stop.wait()
    shutdown(k, server, cfg.grace)
    return 0


def shutdown(k: Kernel, server: object, grace: float) -> None:
    """Refuse new jobs, give running ones `grace` seconds, kill the rest, stop everything."""
    logger.info("shutting_down", live=len(k.table.live()), grace_s=grace)
    k.draining.set()
    deadline = time.monotonic() + grace
    while k.table.live() and time.monotonic() < deadline:
        time.sleep(0.1)
    k.executor.shutdown_jobs()
    k.executor.stop()
    server.stop(grace=1).wait()
    k.supervisor.stop()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return adduser(args) if args.command == "adduser" else run(args)


if __name__ == "__main__":
    sys.exit(main())
