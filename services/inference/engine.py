"""Engine: the inference service's core. Holds loaded models, their KV pools and per-sequence
sampler state; runs one mixed prefill/decode batch per step() call. A plain class: tests and
benches compose it in-process, the gRPC servicer only translates messages to it."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog
import torch

from llmasos.drivers.cuda.backend import kernels_for
from llmasos.drivers.loaders.cache import load_weights, weights_cache_dir
from llmasos.drivers.loaders.probe import probe
from llmasos.drivers.loaders.progress import LoadCancelled, Report
from llmasos.drivers.model.attention import padding_exact
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool, PoolGeometry
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.model.ranges import named_range
from llmasos.drivers.prune import semi_sparse
from llmasos.drivers.tokenizer import Tokenizer
from llmasos.services.inference import quantize
from llmasos.services.inference.compute_thread import on_compute_thread, on_passing_thread
from llmasos.services.inference.output import SequenceOutput
from llmasos.services.inference.parallel import (
    ALL_HERE,
    RankArgs,
    Spread,
    StepFlight,
    TPModel,
    TPPool,
    load_parallel,
)
from llmasos.services.inference.sampler import SamplingParams, sample

log = structlog.get_logger()

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}  # bf16 matmul is ~30x slower on CPU


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # the path it was loaded from
    architecture: str
    parameters: int
    dtype: str
    memory_bytes: int  # the weights on the device (the KV pool is reported by geometry)
    context_length: int
    device: str
    vocab_size: int
    quant: str = "none"  # the quantization recipe applied after load
    tp: int = 1  # tensor-parallel ranks (parallel.py)
    pp: int = 1  # pipeline stages (parallel.py)


@dataclass
class StepEntry:
    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    params: SamplingParams = field(default_factory=SamplingParams)
    generated_ids: list[int] | None = None
    reset: bool = False


@dataclass(frozen=True)
class StepResult:
    seq_id: int
    token_id: int
    logprob: float
    sampled: bool
    text: str
    stopped: bool  # a stop token or stop string ended the sequence
    error: str = ""  # this entry alone was refused (its job's fault); nothing ran for it


@dataclass
class SeqState:
    output: SequenceOutput
    generated: list[int]


@dataclass
class Loaded:
    entry: ModelEntry
    model: LlamaModel | TPModel
    tokenizer: Tokenizer
    pool: KVPool | TPPool
    seqs: dict[int, SeqState] = field(default_factory=dict)
    swapped: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Launched:
    """A step whose forward is launched: what sampling its logits needs."""

    m: Loaded
    entries: list[StepEntry]   # the entries that run
    run: list[int]             # their indices in the request
    results: list[StepResult]
    sample_seqs: list[int]     # the batch's sampled sequences, in logits order
    t0: float
    flight: StepFlight | None = None


def close(m: Loaded) -> None:
    """Stop what a model runs beside this process (its tp/pp ranks)."""
    if isinstance(m.model, TPModel):
        m.model.close()


def stoppable(report: Report | None, cancelled: Callable[[], bool]) -> Report:
    """A Report that raises LoadCancelled once the caller has gone (between two steps)."""
    def step(stage: str, done: int, total: int, unit: str) -> None:
        if cancelled():
            raise LoadCancelled(f"cancelled during {stage}")
        if report is not None:
            report(stage, done, total, unit)
    return step


class Engine:
    def __init__(self, state_dir: str, device: str = "cpu", block_size: int = 16,
                 kv_budget_bytes: int = 256 << 20, quant: str = "none",
                 cache_dir: str | None = None) -> None:
        self.state_dir = state_dir
        self.cache_dir = cache_dir or weights_cache_dir()   # converted weights: XDG cache
        self.device = torch.device(device)
        self.block_size = block_size
        self.kv_budget_bytes = kv_budget_bytes
        self.default_quant = quantize.resolve(quant, self.device).name  # what "" deploys
        self._models: dict[str, Loaded] = {}
        self._handles = itertools.count(1)
        self._lock = threading.RLock()  # one step at a time per process: the pool is shared
        self._loading: set[str] = set()  # names being loaded, outside the lock (steps go on)
        self._load_ended = threading.Condition(self._lock)  # a name left _loading
        self.last_compute_ms = 0.0

    # ---- models ----

    def load(self, name: str, path: str, dtype: str = "", kv_budget_bytes: int = 0,
             quant: str = "", tp: int = 0, pp: int = 0, report: Report | None = None,
             cancelled: Callable[[], bool] = lambda: False, threads: int = 0,
             spread: Spread = ALL_HERE) -> ModelEntry:
        """Load a GGUF file or HF folder under name; raises FileNotFoundError, ValueError
        (bad dtype, unsupported architecture, name taken) or KVBudgetError. `report` hears the
        load's progress (drivers/loaders/progress.py); once `cancelled()` is true the load
        stops at its next step with LoadCancelled, and a finished load is not kept. threads > 0
        sets this process's torch threads from now on (replicas sharing a host's cores; a tp/pp
        model's ranks split their replica's share);
        `spread` places tp/pp ranks on other hosts (parallel.py)."""
        if not name:
            raise ValueError("model name must not be empty")
        if threads > 0 and tp * pp > 1:   # the replica's share of the cores, split by rank
            threads = max(1, threads // (max(tp, 1) * max(pp, 1)))
        if threads > 0 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)   # this thread's OpenMP team and the compute thread's
            on_compute_thread(torch.set_num_threads, threads)
            log.info("torch_threads", threads=threads)
        dtype_name = dtype or DEFAULT_DTYPE.get(self.device.type, "float32")
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        # the default recipe applies where it can: tp/pp ranks do not quantize
        default = self.default_quant if tp <= 1 and pp <= 1 else "none"
        recipe = quantize.resolve(quant or default, self.device)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such model file or folder: {path}")
        with self._lock:   # reserve the name; the load itself runs beside the steps
            if name in self._models:
                raise ValueError(f"model name {name!r} is already loaded")
            if name in self._loading:
                raise ValueError(f"a load of {name!r} is under way")
            self._loading.add(name)
        try:
            # on a thread of its own that ends with the load: its OpenMP team must not outlive
            # it, or every later step runs slower (compute_thread.py)
            loaded = on_passing_thread(
                self._load, name, path, dtype_name, kv_budget_bytes, recipe, max(tp, 1),
                max(pp, 1), stoppable(report, cancelled), bar=report is None, spread=spread,
                threads=threads)
            if isinstance(loaded.model, LlamaModel):   # timed where its steps will run
                on_compute_thread(loaded.model.tune)
                # the probe may have packed copies of the weights for our own kernel
                loaded.entry = replace(loaded.entry, memory_bytes=loaded.model.weight_bytes)
                cfg = loaded.model.cfg   # padding_exact measured now, not in the first step
                self._split_groups(loaded, cfg.num_heads // cfg.num_kv_heads)
            with self._lock:   # checked where it is kept: a caller gone now never sees it
                if cancelled():
                    close(loaded)
                    raise LoadCancelled(f"the load of {name!r} was cancelled")
                self._models[name] = loaded
            return loaded.entry
        finally:
            with self._lock:
                self._loading.discard(name)
                self._load_ended.notify_all()

    def abandon(self, name: str, patience: float = 120.0) -> None:
        """The caller gave up on loading `name`: wait (up to `patience` s) for a load under way
        to stop, then unload whatever it kept; nothing loaded is no error."""
        with self._load_ended:
            self._load_ended.wait_for(lambda: name not in self._loading, patience)
            if name in self._models:
                self.unload(name)

    def _load(self, name: str, path: str, dtype_name: str, kv_budget_bytes: int,
              recipe: quantize.Recipe, tp: int, pp: int, report: Report,
              bar: bool, spread: Spread = ALL_HERE, threads: int = 0) -> Loaded:
        t0 = time.perf_counter()
        # config and tokenizer checked before any weight is read: a file we cannot run
        # fails here in a fraction of a second, with nothing (no weights cache) written
        _, tokenizer = probe(path)
        if recipe.quantized and (tp > 1 or pp > 1):
            raise ValueError("quant and tp/pp do not combine yet; deploy with --quant none")
        int8_file = quantize.cache_file(path, recipe, self.device, self.cache_dir)
        hit = quantize.cached(int8_file)   # the model as this recipe left it: no dequantizing
        if hit is not None:
            cfg, weights = hit.cfg, hit.standins()
        else:   # where the Triton kernels run, GGUF Q8_0/Q4_1 weights stay in their blocks
            cfg, weights, kind = load_weights(
                path, self.cache_dir,
                keep_quantized=kernels_for(self.device) is not None and tp == pp == 1,
                cache=not recipe.quantized,   # no fp32 cache for a quantized model
                progress=bar, report=report)   # bars on stderr only when nobody hears reports
        torch_dtype = DTYPES[dtype_name]
        budget = kv_budget_bytes or self.kv_budget_bytes
        if tp > 1 or pp > 1:   # the budget is the whole model's: each rank holds 1/N of a block
            args = RankArgs(os.path.abspath(path), self.cache_dir, dtype_name, str(self.device),
                            self.block_size, budget // (tp * pp), threads=threads)
            model, pool, memory = load_parallel(name, tp, pp, cfg, weights, torch_dtype, args,
                                                spread)
            parameters = sum(t.numel() for t in weights.values())
        else:
            model = LlamaModel(cfg, weights, torch_dtype, self.device, report, tune=False)
            parameters = model.num_parameters  # before packing: a tied LM head counts once
            if hit is not None:
                quantize.restore(model, hit, recipe)
            elif quantize.apply(model, recipe, tokenizer, report):
                quantize.save(int8_file, model, cfg, weights, path)
            if cfg.sparsity == "2:4":   # a pruned folder: sparse kernels where the GPU has them
                semi_sparse.apply(model)
            pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, budget,
                          self.block_size, model.kv_dtype, self.device)
            memory = model.weight_bytes
        del weights
        entry = ModelEntry(
            name=name, source=os.path.abspath(path), architecture=cfg.architecture,
            parameters=parameters, dtype=str(torch_dtype).removeprefix("torch."),
            memory_bytes=memory,
            context_length=cfg.max_position_embeddings, device=str(self.device),
            vocab_size=cfg.vocab_size, quant=recipe.name, tp=tp, pp=pp,
        )
        log.info("model_loaded", name=name, path=path, seconds=time.perf_counter() - t0,
                 blocks=pool.geometry.num_blocks, block_bytes=pool.geometry.block_bytes)
        return Loaded(entry, model, tokenizer, pool)

    def unload(self, name: str) -> None:
        with self._lock:
            m = self._get(name)
            del self._models[name]
            close(m)

    def quant_formats(self) -> list[str]:
        return quantize.formats(self.device)

    def models(self) -> list[ModelEntry]:
        return [m.entry for m in self._models.values()]

    def _get(self, name: str) -> Loaded:
        loaded = self._models.get(name)
        if loaded is None:
            raise KeyError(f"model {name!r} is not loaded")
        return loaded

    # ---- text ----

    def tokenize(self, name: str, text: str | None = None,
                 messages: list[dict[str, str]] | None = None) -> list[int]:
        tok = self._get(name).tokenizer
        if messages is not None:
            return tok.encode_chat(messages)
        return tok.encode_prompt(text or "")

    def detokenize(self, name: str, ids: list[int]) -> str:
        return self._get(name).tokenizer.decode(list(ids))

    def eos_token_ids(self, name: str) -> list[int]:
        return list(self._get(name).tokenizer.eos_token_ids)

    def geometry(self, name: str) -> PoolGeometry:
        return self._get(name).pool.geometry

    # ---- the step ----

    def step(self, name: str, entries: list[StepEntry]) -> list[StepResult]:
        """Run one batch; one result per entry, in order. An entry the model cannot run gets
        a result with `error` set and the others run on (a bad request fails only its job).
        A pp model's step is launched down its pipeline and waited for on this thread, so the
        compute thread launches the next step (another slot's: kernel/replicas.py) meanwhile."""
        launched = on_compute_thread(self._launch, name, entries)
        if not isinstance(launched, Launched):
            return launched
        logits = launched.flight.wait()
        return on_compute_thread(self._finish, launched, logits)

    def _launch(self, name: str, entries: list[StepEntry]) -> list[StepResult] | Launched:
        """The step computed (its results), or for a pp model launched (Launched)."""
        with self._lock:
            m = self._get(name)
            self._check_batch(entries)
            results = [StepResult(e.seq_id, 0, 0.0, False, "", False, self._refusal(m, e))
                       for e in entries]
            run = [i for i, r in enumerate(results) if not r.error]
            if not run:
                return results
            t0 = time.perf_counter()
            good = [entries[i] for i in run]
            with named_range("batch"):   # named ranges: bench/engine_step.py's breakdown
                slices = [SeqSlice(list(e.token_ids), e.start_pos, list(e.block_table),
                                   e.sample) for e in good]
                cfg = m.model.cfg
                gqa = cfg.num_heads // cfg.num_kv_heads
                batch = build_batch(slices, self.block_size, gqa, self.device,
                                    for_kernels=m.model.kernels is not None,
                                    split_groups=self._split_groups(m, gqa),
                                    one_decode_group=getattr(m.model, "decode_kernel", None)
                                    is not None)
            launched = Launched(m, good, run, results, batch.sample_seqs, t0)
            if isinstance(m.model, TPModel) and m.model.stages > 1:
                launched.flight = m.model.launch(batch, m.pool)
                return launched
            return self._land(launched, m.model.forward(batch, m.pool))

    def _finish(self, launched: Launched, logits: torch.Tensor) -> list[StepResult]:
        with self._lock:
            return self._land(launched, logits)

    def _land(self, launched: Launched, logits: torch.Tensor) -> list[StepResult]:
        """Sample the step's logits into its results (the engine lock held)."""
        results, run = launched.results, launched.run
        if launched.sample_seqs:
            sampled = self._sample(launched.m, launched.entries, launched.sample_seqs, logits,
                                   [results[i] for i in run])
            for i, r in zip(run, sampled, strict=True):
                results[i] = r
        self.last_compute_ms = (time.perf_counter() - launched.t0) * 1000
        return results

    def _split_groups(self, m: Loaded, gqa: int) -> bool:
        """Whether each attention shape needs a group of its own to stay batch-invariant: where
        SDPA on this CPU is not exact under padding (attention.padding_exact)."""
        if self.device.type != "cpu" or m.model.kernels is not None:
            return False
        dtype = getattr(m.model, "dtype", torch.float32)   # a TPModel's ranks: fp32 on the CPU
        return not padding_exact(gqa, m.model.cfg.head_dim, dtype, self.block_size)

    @staticmethod
    def _check_batch(entries: list[StepEntry]) -> None:
        """What only the kernel can get wrong refuses the whole step."""
        seen: set[int] = set()
        for e in entries:
            if e.seq_id in seen:
                raise ValueError(f"seq_id {e.seq_id} appears twice in one step")
            seen.add(e.seq_id)

    def _refusal(self, m: Loaded, e: StepEntry) -> str:
        """Why this entry cannot run ("" when it can)."""
        vocab = m.entry.vocab_size
        if not e.token_ids:
            return f"token_ids of seq_id {e.seq_id} is empty"
        if e.start_pos + len(e.token_ids) > m.entry.context_length:
            return (f"seq_id {e.seq_id} runs past the model's context length "
                    f"{m.entry.context_length}")
        if any(not 0 <= t < vocab for t in e.token_ids):
            return f"token_ids: seq_id {e.seq_id} holds ids outside [0, {vocab})"
        last = e.start_pos + len(e.token_ids) - 1
        if last // self.block_size >= len(e.block_table):
            return (f"block table of {len(e.block_table)} blocks does not cover position "
                    f"{last} of seq_id {e.seq_id}")
        try:
            m.pool.check(e.block_table)
            if e.sample:
                e.params.validate(vocab)
        except ValueError as err:
            return str(err)
        return ""

    def _state(self, m: Loaded, e: StepEntry) -> SeqState:
        state = m.seqs.get(e.seq_id)
        if state is None or e.reset:
            generated = list(e.generated_ids or [])
            output = SequenceOutput(m.tokenizer, e.params, m.tokenizer.eos_token_ids, generated)
            state = m.seqs[e.seq_id] = SeqState(output, generated)
        return state

    def _sample(self, m: Loaded, entries: list[StepEntry], rows: list[int], logits: torch.Tensor,
                results: list[StepResult]) -> list[StepResult]:
        states = [self._state(m, entries[i]) for i in rows]
        with named_range("sampling"):
            token_ids, logprobs = sample(logits, [entries[i].params for i in rows],
                                         [s.generated for s in states],
                                         [len(s.generated) for s in states])
            token_ids, logprobs = token_ids.tolist(), logprobs.tolist()
        with named_range("detokenize"):
            for i, state, tok, lp in zip(rows, states, token_ids, logprobs, strict=True):
                state.generated.append(tok)
                text, stopped = state.output.append(tok)
                results[i] = StepResult(entries[i].seq_id, tok, lp, True, text, stopped)
        return results

    # ---- blocks ----

    def copy_blocks(self, name: str, src: list[int], dst: list[int]) -> None:
        on_compute_thread(self._copy_blocks, name, src, dst)

    def _copy_blocks(self, name: str, src: list[int], dst: list[int]) -> None:
        with self._lock:
            self._get(name).pool.copy_blocks(list(src), list(dst))

    def swap_out(self, name: str, blocks: list[int]) -> int:
        return on_compute_thread(self._swap_out, name, blocks)

    def _swap_out(self, name: str, blocks: list[int]) -> int:
        with self._lock:
            m = self._get(name)
            handle = next(self._handles)
            m.swapped[handle] = m.pool.read_blocks(list(blocks))
            return handle

    def swap_in(self, name: str, handle: int, blocks: list[int]) -> None:
        on_compute_thread(self._swap_in, name, handle, blocks)

    def _swap_in(self, name: str, handle: int, blocks: list[int]) -> None:
        with self._lock:
            m = self._get(name)
            if handle not in m.swapped:
                raise KeyError(f"no swap handle {handle}")
            m.pool.write_blocks(list(blocks), m.swapped[handle])
            del m.swapped[handle]

    def release(self, name: str, seq_ids: list[int], swap_handles: list[int] = ()) -> None:
        """Without the engine lock, so it never waits for a forward: the kernel releases only
        jobs that are in no step, and each pop is one atomic dict operation."""
        m = self._get(name)
        for s in seq_ids:
            m.seqs.pop(s, None)
        for h in swap_handles:
            m.swapped.pop(h, None)
