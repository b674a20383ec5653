"""llm-ps: the process table of LLM jobs, as ps(1) shows Unix processes.

    llm-ps                 your jobs        llm-ps -a          everyone's (root)
    llm-ps -u alice        alice's jobs     llm-ps -o pid,state,tok_out,name
    llm-ps --json          for scripts      llm-ps --services  the supervised services
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmasos import fmt
from llmasos.names import reason_name, state_name
from llmasos.proto import kernel_pb2
from llmasos.tools import common

Info = kernel_pb2.ProcessInfo


@dataclass(frozen=True)
class Column:
    header: str
    get: Callable[[Info, float], object]  # (entry, now) -> cell
    right: bool = False


def _age(p: Info, now: float) -> str:
    return fmt.duration((p.ended_unix or now) - p.created_unix) if p.created_unix else "-"


def _model(p: Info, now: float) -> str:
    """name, or name@replica when its model has several (data parallelism)."""
    if p.replicas <= 1:
        return p.model
    return f"{p.model}@{p.replica if p.replica >= 0 else '-'}"


COLUMNS: dict[str, Column] = {
    "pid":     Column("PID", lambda p, now: p.pid, True),
    "ppid":    Column("PPID", lambda p, now: p.ppid, True),
    "user":    Column("USER", lambda p, now: p.user),
    "state":   Column("STATE", lambda p, now: state_name(p.state)),
    "model":   Column("MODEL", _model),
    "replica": Column("REPLICA", lambda p, now: p.replica if p.replica >= 0 else "-", True),
    "prio":    Column("PRIO", lambda p, now: p.nice, True),
    "tok_in":  Column("TOK_IN", lambda p, now: p.prompt_tokens, True),
    "tok_out": Column("TOK_OUT", lambda p, now: p.generated_tokens, True),
    "kv":      Column("KV", lambda p, now: p.kv_blocks, True),
    "age":     Column("AGE", _age, True),
    "cpu":     Column("CPU", lambda p, now: fmt.duration(p.cpu_seconds), True),
    "preempt": Column("PREEMPT", lambda p, now: p.preemptions, True),
    "status":  Column("STATUS", lambda p, now: p.exit_status if p.exit_reason else "", True),
    "reason":  Column("REASON", lambda p, now: reason_name(p.exit_reason)),
    "name":    Column("NAME", lambda p, now: p.name),
}
DEFAULT_FIELDS = "pid,user,state,model,prio,tok_in,tok_out,kv,age"


def fields(spec: str) -> list[str]:
    """'-o pid,state' -> ['pid', 'state']; an unknown field is a usage error (ValueError)."""
    names = [f.strip().lower() for f in spec.split(",") if f.strip()]
    bad = [f for f in names if f not in COLUMNS]
    if bad or not names:
        raise ValueError(f"unknown field {', '.join(bad) or '(none)'}; "
                         f"known fields: {', '.join(COLUMNS)}")
    return names


def render(procs: list[Info], names: list[str], now: float | None = None) -> str:
    now = time.time() if now is None else now
    cols = [COLUMNS[n] for n in names]
    rows = [[c.get(p, now) for c in cols] for p in procs]
    return fmt.table([c.header for c in cols], rows, [c.header for c in cols if c.right])


def render_services(services: list[kernel_pb2.ServiceInfo],
                    nodes: list[kernel_pb2.NodeInfo] = ()) -> str:
    """The services (a node's as NODE/NAME, with the replicas each holds), then the nodes."""
    rows = [[s.name, s.pid or "-", s.address or "-", s.state, s.restarts,
             fmt.duration(s.uptime_s) if s.pid and s.uptime_s else "-",
             ",".join(s.replicas) or "-"] for s in services]
    out = fmt.table(["NAME", "PID", "ADDRESS", "STATE", "RESTARTS", "UPTIME", "REPLICAS"],
                    rows, ["PID", "RESTARTS", "UPTIME"])
    return out + ("\n\n" + render_nodes(nodes) if nodes else "")


def render_devices(devices: list[kernel_pb2.Device]) -> str:
    """cpu 16c 31.2/128.0G, gpu0 NVIDIA H200 1.2/139.8G 35%"""
    gib = 1 << 30
    parts = []
    for d in devices:
        mem = f"{d.memory_used / gib:.1f}/{d.memory_total / gib:.1f}G"
        parts.append(f"cpu {d.cores}c {mem}" if d.kind == "cpu" else
                     f"gpu{d.index} {d.name} {mem} {d.utilization:.0%}")
    return ", ".join(parts) or "-"


def render_nodes(nodes: list[kernel_pb2.NodeInfo]) -> str:
    rows = [[n.name, n.address or "-", n.state, f"{n.heartbeat_age_s:.1f}s",
             ",".join(n.replicas) or "-", render_devices(list(n.devices))] for n in nodes]
    return fmt.table(["NODE", "ADDRESS", "STATE", "HEARTBEAT", "REPLICAS", "DEVICES"], rows,
                     ["HEARTBEAT"])


def build_parser() -> argparse.ArgumentParser:
    ap = common.parser("llm-ps", "List LLM jobs (PID USER STATE MODEL PRIO TOK_IN TOK_OUT KV "
                                 "AGE) or the supervised services.")
    ap.add_argument("-a", "--all", action="store_true", help="everyone's jobs (root)")
    ap.add_argument("-u", "--user", default="", help="only this user's jobs")
    ap.add_argument("-o", "--format", default=DEFAULT_FIELDS, metavar="FIELDS",
                    help=f"comma-separated columns, of: {', '.join(COLUMNS)}")
    ap.add_argument("--json", action="store_true", help="JSON for scripts")
    ap.add_argument("--services", action="store_true",
                    help="the services: name, pid, address, state, restarts, uptime")
    ap.add_argument("--no-headers", action="store_true", help="omit the header line")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        names = fields(args.format)
    except ValueError as err:
        ap.error(str(err))
    return common.run("llm-ps", lambda: show(args, names))


def show(args: argparse.Namespace, names: list[str]) -> int:
    with common.client(args) as c:
        if args.services:
            services, nodes = c.services(), c.nodes()
            out = (json.dumps([fmt.as_dict(s) for s in services], indent=1) if args.json
                   else render_services(services, nodes))
        else:
            procs = c.ps(args.all, args.user)
            out = (json.dumps([fmt.as_dict(p) for p in procs], indent=1) if args.json
                   else render(procs, names))
    if args.no_headers and not args.json:
        out = "\n".join(out.splitlines()[1:])
    if out:
        print(out)
    sys.stdout.flush()
    return common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
