"""HF transformers baselines for the serve benchmark, in a worker process the bench can kill.

    static_b{16,32,64}          `generate` in batches of arrival order (pads prompts, runs each
                                batch to its longest output)
    static_sorted_b{16,32}      the same, requests sorted by output then prompt length first, so
                                a batch's rows finish together (the least padding a static batch
                                can have when lengths are known)
    continuous                  HF's own continuous batching (paged cache, init_continuous_batching
                                with a per-request max_new_tokens and EOS off)

Every configuration is warmed up once before it is measured. A run that does not finish by its
deadline, or finishes with fewer tokens than asked, is reported with a status and its token count
(never as a figure): stalled (continuous: no request finished in the last 30 s), too_slow (still
progressing), timed_out (the worker did not answer at all: one static batch outran the
deadline), dropped, crashed. The worker is then killed and restarted, so a stalled thread cannot
steal the CPU from the next measurement.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from workload import Request, embedded_gguf, requests


@dataclass(frozen=True)
class Config:
    name: str
    batch: int = 0          # 0: continuous batching
    sort: bool = False

    def distinct(self, n: int) -> bool:
        """False where, for n requests, it repeats another: one batch holds them all."""
        return self.batch < n or self.batch == n and not self.sort or not self.batch


CONFIGS = {c.name: c for c in (
    Config("static_b16", 16), Config("static_b32", 32), Config("static_b64", 64),
    Config("static_sorted_b16", 16, sort=True), Config("static_sorted_b32", 32, sort=True),
    Config("continuous"),
)}


@dataclass
class Outcome:
    status: str             # ok | stalled | too_slow | timed_out | dropped | crashed
    tokens: int
    expected: int
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --- inside the worker ----------------------------------------------------------------------

class Model:
    """The embedded GGUF through transformers, in fp32 as our engine runs it."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = embedded_gguf()
        folder, name = os.path.dirname(path), os.path.basename(path)
        self.tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left")
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32).eval()

    def static(self, reqs: list[Request], cfg: Config, deadline: float) -> Outcome:
        import torch

        order = sorted(reqs, key=lambda r: (r.output_tokens, len(r.prompt))) if cfg.sort else reqs
        useful = sum(r.output_tokens for r in reqs)
        done, start = 0, time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(order), cfg.batch):
                if time.perf_counter() > deadline:
                    return Outcome("too_slow", done, useful, time.perf_counter() - start)
                group = order[i:i + cfg.batch]
                longest = max(r.output_tokens for r in group)
                enc = self.tok([r.prompt for r in group], return_tensors="pt", padding=True)
                out = self.model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest,
                                          do_sample=False, pad_token_id=self.tok.pad_token_id)
                assert out.shape[1] - enc.input_ids.shape[1] == longest
                done += sum(r.output_tokens for r in group)   # only the tokens each one asked
        return Outcome("ok", done, useful, time.perf_counter() - start)

    def continuous(self, reqs: list[Request], deadline: float) -> Outcome:
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        ids = [self.tok(r.prompt).input_ids for r in reqs]
        useful = sum(r.output_tokens for r in reqs)
        longest = max(r.output_tokens for r in reqs)
        gen = GenerationConfig(do_sample=False, max_new_tokens=longest, eos_token_id=-1,
                               pad_token_id=self.tok.pad_token_id)
        hints = WorkloadHints(max_prompt_length=max(map(len, ids)), max_generated_length=longest,
                              num_requests=len(reqs))   # as generate_batch sizes its cache
        with torch.inference_mode():
            # a server builds its manager once: set-up and warm-up stay outside the clock
            manager = self.model.init_continuous_batching(
                generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(),
                workload_hints=hints)
            manager.warmup()
            manager.start()
            start = time.perf_counter()
            want = {manager.add_request(x, request_id=f"r{i}", max_new_tokens=r.output_tokens,
                                        eos_token_id=-1): r.output_tokens
                    for i, (x, r) in enumerate(zip(ids, reqs, strict=True))}
            got: dict[str, int] = {}
            last_result = time.perf_counter()
            status = "ok"
            while len(got) < len(want):
                if time.perf_counter() > deadline:   # stalled: nothing for the last 30 s
                    status = "stalled" if time.perf_counter() - last_result > 30 else "too_slow"
                    break
                if not manager.is_running():
                    status = "crashed"
                    break
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    failed = result.error is not None
                    got[result.request_id] = 0 if failed else len(result.generated_tokens)
                    last_result = time.perf_counter()
            seconds = time.perf_counter() - start
            manager.stop(block=True, timeout=10, hard_stop=status != "ok")
        tokens = sum(min(n, want[r]) for r, n in got.items())
        if status == "ok" and any(got[r] != n for r, n in want.items()):
            status = "dropped"    # every request answered, but some with fewer tokens
        return Outcome(status, tokens, useful, seconds,
                       f"{len(got)} of {len(want)} requests finished")

    def run(self, cfg: Config, reqs: list[Request], deadline: float) -> Outcome:
        if cfg.batch:
            return self.static(reqs, cfg, deadline)
        return self.continuous(reqs, deadline)


def workload(n: int, seed: int) -> list[Request]:
    """The bench's request mix; a negative seed is the short warm-up mix (outputs of 4–12)."""
    return requests(n, seed=seed) if seed >= 0 else requests(n, seed=-seed, outputs=(4, 12))


def serve(conn: Connection) -> None:
    """The worker: load once, then answer (config name, n, seed, seconds allowed) messages."""
    import torch

    torch.set_num_threads(int(os.environ.get("HF_THREADS", torch.get_num_threads())))
    model = Model()
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        name, n, seed, allowed = msg
        reqs = workload(n, seed)
        conn.send(model.run(CONFIGS[name], reqs, time.perf_counter() + allowed))


# --- in the bench ----------------------------------------------------------------------------

class HFWorker:
    """The parent's handle: run one configuration with a watchdog; a worker that overruns its
    deadline is killed (its thread may still be computing) and a fresh one takes its place."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.proc: mp.Process | None = None
        self.conn: Connection | None = None

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(600) or self.conn.recv() != "ready":
            raise RuntimeError("the HF worker did not load the model in 600 s")

    def run(self, name: str, n: int, seed: int, allowed: float) -> Outcome:
        """seed < 0: a short warm-up workload (outputs of 4–12 tokens)."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        start = time.perf_counter()
        self.conn.send((name, n, seed, allowed))
        expected = sum(r.output_tokens for r in workload(n, seed))
        if self.conn.poll(allowed + 60):   # its own deadline, plus time to stop cleanly
            try:
                outcome = self.conn.recv()
                if not outcome.ok:
                    self._kill()   # its generation thread may still be running
                return outcome
            except EOFError:   # the worker died mid-run
                self.proc.join(10)
                code = self.proc.exitcode
                self._kill()
                return Outcome("crashed", 0, expected, time.perf_counter() - start,
                               f"the worker died (exit code {code})")
        self._kill()
        return Outcome("timed_out", 0, expected, time.perf_counter() - start,
                       f"no answer in {allowed + 60:.0f} s; worker killed")

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
        self.proc = self.conn = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(30)
        self._kill()
