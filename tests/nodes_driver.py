"""The client side of tests/test_nodes.py, run inside the head's network namespace (the head's
address exists only there): `python tests/nodes_driver.py ADDRESS TOKEN COMMAND ...` prints
one JSON line. The pytest process cannot open a socket in another namespace, so each step of
the test is one run of this script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc

from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc

ENDED = common_pb2.PROC_ZOMBIE


class Head:
    def __init__(self, address: str, token: str) -> None:
        self.stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(address))
        self.auth = [("authorization", f"Bearer {token}")]

    def call(self, name: str, request: object, timeout: float = 120) -> object:
        return getattr(self.stub, name)(request, metadata=self.auth, timeout=timeout)

    def spawn(self, model: str, prompts: list[str], tokens: int) -> list[int]:
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens)
        return [self.call("Spawn", kernel_pb2.SpawnRequest(model=model, prompt=p,
                                                           sampling=sampling)).pid
                for p in prompts]

    def wait(self, pids: list[int]) -> list[dict]:
        out = []
        for pid in pids:
            r = self.call("Wait", kernel_pb2.WaitRequest(pid=pid), timeout=600)
            out.append({"pid": pid, "tokens": list(r.token_ids), "replica": r.info.replica,
                        "status": r.info.exit_status})
        return out

    def busy_on(self, pids: list[int], replica: int, timeout: float = 300) -> bool:
        """Wait until a job of pids has made a token on the replica (and is not done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ps = self.call("Ps", kernel_pb2.PsRequest(all=True)).processes
            if any(p.pid in pids and p.replica == replica and p.generated_tokens > 0 and
                   p.state != ENDED for p in ps):
                return True
            time.sleep(0.05)
        return False


def deploy(head: Head, path: str, name: str, nodes: str, replicas: str = "0", tp: str = "0",
           pp: str = "0") -> dict:
    try:
        info = head.call("Deploy", kernel_pb2.DeployRequest(
            path=path, name=name, nodes=nodes.split(","), replicas=int(replicas), tp=int(tp),
            pp=int(pp)), timeout=900)
        return {"ok": True, "replicas": info.replicas}
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}


def services(head: Head) -> dict:
    reply = head.call("Services", kernel_pb2.ServicesRequest())
    return {"services": {s.name: {"state": s.state, "node": s.node, "replicas": list(s.replicas),
                                  "pid": s.pid, "address": s.address} for s in reply.services},
            "nodes": {n.name: {"state": n.state, "replicas": list(n.replicas),
                               "services": list(n.services), "address": n.address,
                               "devices": [{"kind": d.kind, "cores": d.cores,
                                            "memory_total": d.memory_total}
                                           for d in n.devices]} for n in reply.nodes}}


def cut(head: Head, model: str, tokens: int, iface: str, prompts: list[str]) -> dict:
    """Spawn the jobs, cut the link once the node's replica has made a token, wait for all."""
    pids = head.spawn(model, prompts, tokens)
    busy = head.busy_on(pids, 1)
    subprocess.run(["ip", "link", "set", iface, "down"], check=True)
    cut_at = time.monotonic()
    results = head.wait(pids)
    return {"busy": busy, "results": results, "after_cut_s": time.monotonic() - cut_at}


def crash(head: Head, model: str, tokens: int, pid: int, prompts: list[str]) -> dict:
    """Spawn the jobs, kill -9 the node's replica process once it has made a token, wait."""
    pids = head.spawn(model, prompts, tokens)
    busy = head.busy_on(pids, 1)
    os.kill(pid, signal.SIGKILL)
    return {"busy": busy, "results": head.wait(pids)}


def main(argv: list[str]) -> None:
    address, token, command, *rest = argv
    head = Head(address, token)
    if command == "jobs":        # MODEL TOKENS PROMPTS_JSON
        out: object = head.wait(head.spawn(rest[0], json.loads(rest[2]), int(rest[1])))
    elif command == "deploy":    # PATH NAME NODES [REPLICAS [TP [PP]]]
        out = deploy(head, *rest)
    elif command == "undeploy":  # NAME
        head.call("Undeploy", kernel_pb2.UndeployRequest(name=rest[0]))
        out = {"ok": True}
    elif command == "services":
        out = services(head)
    elif command == "metrics":   # the Prometheus text
        out = head.call("Metrics", kernel_pb2.MetricsRequest()).text
    elif command == "crash":     # MODEL TOKENS PID PROMPTS_JSON
        out = crash(head, rest[0], int(rest[1]), int(rest[2]), json.loads(rest[3]))
    elif command == "spawn-busy":  # MODEL TOKENS PROMPTS_JSON: the pids, once one made a token
        pids = head.spawn(rest[0], json.loads(rest[2]), int(rest[1]))
        out = {"pids": pids, "busy": head.busy_on(pids, 0)}
    elif command == "wait":      # PIDS_JSON
        out = head.wait(json.loads(rest[0]))
    elif command == "cut":       # MODEL TOKENS IFACE PROMPTS_JSON
        out = cut(head, rest[0], int(rest[1]), rest[2], json.loads(rest[3]))
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
