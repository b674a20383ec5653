"""What the OpenAI-compatible HTTP gateway costs: the serve-throughput workload (prompts of 8–96
words, outputs of 16–96 tokens, greedy, ignore_eos) sent as streamed /v1/completions requests
through the gateway, against the same requests through the Kernel's gRPC API (Spawn, Read,
Wait), on one booted llmosd, in interleaved rounds (gRPC then HTTP, then HTTP then gRPC, ...) so
that machine noise hits both alike; each side's prompts carry their own one-digit prefix so
that neither reuses the other's KV through the prefix cache.

    .venv/bin/python bench/http_overhead.py [--requests 64] [--rounds 2]

Ends with one JSON line: tokens/s of each, "http_vs_grpc" (target >= 0.9), and TTFT p50s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import MODEL, Round, sampling, summary  # noqa: E402
from workload import Request, boot, requests  # noqa: E402

from llmasos.proto import kernel_pb2, kernel_pb2_grpc  # noqa: E402


async def grpc_round(address: str, md: list, reqs: list[Request]) -> Round:
    out = Round(0, 0.0, [])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)

        async def one(r: Request) -> None:
            t0 = time.perf_counter()
            pid = (await stub.Spawn(kernel_pb2.SpawnRequest(
                model=MODEL, prompt=r.prompt, sampling=sampling(r)), metadata=md)).pid
            first, n = None, 0
            async for chunk in stub.Read(kernel_pb2.ReadRequest(pid=pid), metadata=md,
                                         timeout=3600):
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
                n += len(chunk.token_ids)
            await stub.Wait(kernel_pb2.WaitRequest(pid=pid), metadata=md, timeout=60)
            out.ttft.append(first - t0)
            out.tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        out.seconds = time.perf_counter() - start
    return out


async def http_round(base: str, token: str, reqs: list[Request]) -> Round:
    out = Round(0, 0.0, [])
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=3600) as client:

        async def one(r: Request) -> None:
            body = {"model": MODEL, "prompt": r.prompt, "max_tokens": r.output_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0, first, usage = time.perf_counter(), None, 0
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        usage = event["usage"]["completion_tokens"]
                    elif first is None and event["choices"] and event["choices"][0]["text"]:
                        first = time.perf_counter()
            out.ttft.append(first - t0)
            out.tokens += usage

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        out.seconds = time.perf_counter() - start
    return out


def salted(reqs: list[Request], salt: int) -> list[Request]:
    """The same requests under a prefix of their own (same length), so that neither side
    reuses the other's prompt KV through the prefix cache."""
    return [Request(f"{salt % 10}: {r.prompt}", r.output_tokens) for r in reqs]


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def wait_http(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the HTTP gateway did not come up at {base}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each, interleaved")
    args = ap.parse_args()
    listen = free_address()
    booted = boot(Path(tempfile.mkdtemp(prefix="llmasos-bench-")), "--http", listen)
    base = f"http://{listen}"
    try:
        wait_http(base)
        token = (booted.home / "root.token").read_text().strip()
        asyncio.run(grpc_round(booted.address, booted.metadata, requests(4, seed=99)))  # warm
        asyncio.run(http_round(base, token, requests(4, seed=98)))
        g, h = [], []
        for seed in range(args.rounds):
            reqs = requests(args.requests, seed=seed)
            expect = sum(r.output_tokens for r in reqs)
            sides = [("grpc", lambda rs: grpc_round(booted.address, booted.metadata, rs), g),
                     ("http", lambda rs: http_round(base, token, rs), h)]
            for i, (_, run, out) in enumerate(sides if seed % 2 == 0 else sides[::-1]):
                out.append(asyncio.run(run(salted(reqs, 2 * seed + i))))
            assert g[-1].tokens == h[-1].tokens == expect, "every request must finish"
            print(f"round {seed}: grpc {g[-1].tokens / g[-1].seconds:.1f} tok/s, "
                  f"http {h[-1].tokens / h[-1].seconds:.1f} tok/s", flush=True)
    finally:
        booted.stop()
    gs, hs = summary(g), summary(h)
    print(f"gRPC: {gs['tok_s']:.1f} tok/s, TTFT p50 {gs['ttft_p50_ms']:.0f} ms")
    print(f"HTTP: {hs['tok_s']:.1f} tok/s, TTFT p50 {hs['ttft_p50_ms']:.0f} ms")
    print(json.dumps({"requests": args.requests, "rounds": args.rounds,
                      "grpc_tok_s": round(gs["tok_s"], 2), "http_tok_s": round(hs["tok_s"], 2),
                      "http_vs_grpc": round(hs["tok_s"] / gs["tok_s"], 3),
                      "grpc_ttft_p50_ms": round(gs["ttft_p50_ms"], 1),
                      "http_ttft_p50_ms": round(hs["ttft_p50_ms"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
