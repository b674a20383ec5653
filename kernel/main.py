"""llmosd: the LLMasOS kernel daemon.

  llmosd run [--listen ADDR] [--home DIR] [--config FILE] [--policy P] [--no-embedded] ...
           [--tls-cert FILE --tls-key FILE] [--insecure]
             [--http ADDR | --no-http] [--log-level LEVEL]
  llmosd adduser NAME [--cap CAP ...]      prints the new user's token once
  llmosd quota USER [--max-jobs N] [--max-tokens N] [--kv-share F] [--reset]
  llmosd cache ls|clear [--stale]          converted weights under $XDG_CACHE_HOME/llmasos
  llmosd compress SRC --out DIR --method M [--ratio R] [--calib-tokens N]   prune a model
  llmosd node token [--ttl S]              prints a join token for other machines, once
  llmosd node --join HOST:PORT --token T [--name N] [--advertise HOST]   run a node agent
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog

from llmasos.drivers.prune import cli as prune_cli
from llmasos.kernel import config, join_tokens, log, node_agent, recovery, replicas
from llmasos.kernel.audit import AuditLog
from llmasos.kernel.executor import Executor
from llmasos.kernel.gateway import Gateway
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.pipes import Pipes
from llmasos.kernel.remote_jobs import RemoteJobs
from llmasos.kernel.server import build
from llmasos.version import version_string

logger = structlog.get_logger()
DEFAULT_HTTP = "127.0.0.1:8080"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llmosd", description="the LLMasOS kernel daemon")
    ap.add_argument("--version", action="version", version=version_string("llmosd"))
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
                     "model: none (the default), auto (int8 on the CPU, none on a GPU), int8 or "
                     "a recipe from `llmsh models --formats`")
    run.add_argument("--zombie-ttl", dest="zombie_ttl", type=float)
    run.add_argument("--restart-max", dest="restart_max", type=int)
    run.add_argument("--restart-window", dest="restart_window", type=float)
    run.add_argument("--token-budget", dest="token_budget", type=int,
                     help="most tokens in one step")
    run.add_argument("--max-batch", dest="max_batch", type=int, help="most jobs in one step")
    run.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate: serve over TLS")
    run.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    run.add_argument("--insecure", action="store_true", default=None,
                     help="allow plain text on a non-loopback address (trusted networks only)")
    run.add_argument("--http", metavar="ADDR", default=os.environ.get("LLMASOS_HTTP_ADDR")
                     or DEFAULT_HTTP, help="serve the OpenAI-compatible API and /metrics here "
                     f"(default $LLMASOS_HTTP_ADDR or {DEFAULT_HTTP})")
    run.add_argument("--no-http", dest="http", action="store_const", const="",
                     help="do not start the HTTP gateway")
    run.add_argument("--log-level", dest="log_level", default=None,
                     help="debug, info (default), warning or error; also $LLMASOS_LOG_LEVEL")
    add = sub.add_parser("adduser", help="create a user and print its token once")
    add.add_argument("name")
    add.add_argument("--home")
    add.add_argument("--cap", action="append", default=[], help="capability (repeatable)")
    quota = sub.add_parser("quota", help="show or change a user's quota (0: no limit)")
    quota.add_argument("name")
    quota.add_argument("--home")
    quota.add_argument("--max-jobs", dest="max_jobs", type=int, help="most live jobs")
    quota.add_argument("--max-tokens", dest="max_tokens", type=int,
                       help="most tokens in flight (prompt + max_tokens of every live job)")
    quota.add_argument("--kv-share", dest="kv_share", type=float,
                       help="most KV blocks as a share 0..1 of each model's pool")
    quota.add_argument("--reset", action="store_true", help="back to the defaults first")
    cache = sub.add_parser("cache", help="list or clear what loads keep under "
                           "$XDG_CACHE_HOME/llmasos: converted fp32 weights, int8 weights, "
                           "the matmul probes' answers")
    cache.add_argument("action", choices=["ls", "clear"])
    cache.add_argument("--stale", action="store_true",
                       help="only entries no load will read again (source gone or changed)")
    node = sub.add_parser("node", help="`node token`: make a join token (on the head); "
                          "`node --join HOST:PORT --token T`: offer this machine to a head")
    node.add_argument("action", nargs="?", choices=["token"], help="make a join token")
    node.add_argument("--home", help="the head's state directory (token), or the agent's")
    node.add_argument("--ttl", type=float, default=join_tokens.DEFAULT_TTL,
                      help="seconds the token admits nodes (default a day)")
    node.add_argument("--join", metavar="HOST:PORT", help="the head llmosd's address")
    node.add_argument("--token", help="a join token (or $LLMASOS_JOIN_TOKEN)")
    node.add_argument("--name", help="this node's name (default: the host name)")
    node.add_argument("--advertise", metavar="HOST",
                      help="the address the head reaches this node's services on "
                           "(default: this host's address on the route to the head)")
    node.add_argument("--log-level", dest="log_level", default=None)
    prune_cli.add_arguments(sub.add_parser(
        "compress", help="write a pruned copy of a model as a folder Deploy loads (offline)"))
    return ap.parse_args(argv)


def admin_command(args: argparse.Namespace, cmd: list[str], audit_args: dict) -> int:
    """The security service owns the user store; its CLI edits it under a file lock. The
    change is audited here, as the OS user who ran it."""
    home = args.home or config.default_home()
    code = subprocess.call([sys.executable, "-m", "llmasos.services.security", *cmd,
                            "--state-dir", home])
    AuditLog(os.path.join(home, "audit.log")).record(
        call=f"cli:{args.command}", code="OK" if code == 0 else "FAILED", user=getpass.getuser(),
        uid=os.getuid(), args=audit_args, peer="local")
    return code


def adduser(args: argparse.Namespace) -> int:
    caps = [x for c in args.cap for x in ("--cap", c)]
    return admin_command(args, ["adduser", args.name, *caps],
                         {"name": args.name, "capabilities": ",".join(args.cap)})


def set_quota(args: argparse.Namespace) -> int:
    changes = {f: getattr(args, f) for f in ("max_jobs", "max_tokens", "kv_share")
               if getattr(args, f) is not None}
    flags = [x for f, v in changes.items() for x in (f"--{f.replace('_', '-')}", str(v))]
    return admin_command(args, ["quota", args.name, *flags, *(["--reset"] if args.reset else [])],
                         {"user": args.name, **changes, "reset": args.reset})


def node(args: argparse.Namespace) -> int:
    """`node token` on the head, audited as the OS user who ran it; `node --join` runs an
    agent (kernel/node_agent.py)."""
    if args.action == "token":
        home = args.home or config.default_home()
        token, expiry = join_tokens.create(home, args.ttl)
        AuditLog(os.path.join(home, "audit.log")).record(
            call="cli:node-token", code="OK", user=getpass.getuser(), uid=os.getuid(),
            args={"ttl_s": args.ttl}, peer="local")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expiry))
        print(f"join token (valid until {when}); on the node run: llmosd node --join "
              f"HOST:PORT --token TOKEN", file=sys.stderr)
        print(token)
        return 0
    if not args.join:
        print("llmosd node: give `token` (on the head) or --join HOST:PORT (on a node)",
              file=sys.stderr)
        return 2
    log.configure(args.log_level)
    return node_agent.main(args)


def manage_cache(args: argparse.Namespace) -> int:
    """Offline: the cache is only files; a running daemon re-converts on its next miss."""
    from llmasos.drivers.loaders import cache_entries
    from llmasos.drivers.loaders.cache import weights_cache_dir
    where = weights_cache_dir()
    if args.action == "clear":
        gone = cache_entries.clear(where, stale_only=args.stale)
        print(f"removed {len(gone)} entries, {sum(e.size for e in gone) / 2**20:.1f} MiB, "
              f"from {Path(where).parent}")
        return 0
    listed = [e for e in cache_entries.entries(where) if e.stale or not args.stale]
    print(f"{Path(where).parent}: {len(listed)} entries, "
          f"{sum(e.size for e in listed) / 2**20:.1f} MiB")
    for e in listed:
        name = e.path.relative_to(Path(where).parent)
        said = e.note or f"<- {e.source or '?'}"
        print(f"{e.size / 2**20:9.1f} MiB  {e.kind:6s}  {name}  {said}"
              f"{'  (stale)' if e.stale else ''}")
    return 0


def run(args: argparse.Namespace) -> int:
    log.configure(args.log_level)
    cfg = config.load(args)
    os.makedirs(cfg.home, mode=0o700, exist_ok=True)
    k = Kernel(cfg)
    recovery.recover(k)   # the journal: models, jobs and pids as the last step left them
    world = max((max(1, d.tp) * max(1, d.pp) for d in k.models.values()), default=1)
    replicas.start_services(k, replicas.widest(k), world)   # the services its replicas run in
    k.executor = Executor(k)
    k.remote = RemoteJobs(k)
    k.executor.jobs.on_signal = k.remote.on_signal
    k.pipes = Pipes(k)
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
    recovery.resume(k)
    k.nodes.start()
    k.executor.start()
    k.pipes.start()
    server.start()
    gateway = Gateway(args.http, address, cfg.home) if args.http else None
    if gateway is not None:
        gateway.start()
    print(f"llmosd ready {address}", flush=True)
    logger.info("ready", address=address, models=sorted(k.models), http=args.http or None)
    # Woken every second: a signal that lands on another thread only sets a flag, and its
    # handler runs when the main thread next runs Python (a bare wait() could sleep forever).
    while not stop.wait(1.0):
        pass
    shutdown(k, server, cfg.grace, gateway)
    return 0


def shutdown(k: Kernel, server: object, grace: float, gateway: Gateway | None = None) -> None:
    """Refuse new jobs, give running ones `grace` seconds, kill the rest, stop everything.
    The HTTP gateway stops once the jobs have ended, so its streams end as the jobs do."""
    logger.info("shutting_down", live=len(k.table.live()), grace_s=grace)
    k.draining.set()
    deadline = time.monotonic() + grace
    while k.table.live() and time.monotonic() < deadline:
        time.sleep(0.1)
    k.executor.shutdown_jobs()
    k.pipes.stop()
    k.executor.stop()
    k.nodes.stop()
    if gateway is not None:
        gateway.stop()
    server.stop(grace=1).wait()
    k.supervisor.stop()
    logger.info("stopped")


def compress(args: argparse.Namespace) -> int:
    try:
        prune_cli.run(args, print)
    except (ValueError, OSError, ModuleNotFoundError) as err:
        print(f"llmosd compress: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    commands = {"adduser": adduser, "quota": set_quota, "run": run, "cache": manage_cache,
                "compress": compress, "node": node}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
