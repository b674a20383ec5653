"""The supervisor (MINIX 3's reincarnation server): starts each service as its own OS process,
learns its address through a pipe, watches it through its exit and grpc.health.v1, and restarts
it with exponential backoff within a restart budget. Past the budget the service is FAILED. The
backoff grows only over a crash loop: an incarnation that stayed healthy at least as long as it
took to start (so restarts cost at most half its time) restarts at once.

Protection: each service listens on `unix:<home>/run/<name>.sock`; the run directory is 0700 and
locked for the life of this llmosd. A per-boot secret, made here and kept only in memory, goes to
each service through a pipe at start; every call on the channels made here carries it."""

from __future__ import annotations

import collections
import fcntl
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmasos.services.runtime import STACKS_SIGNAL

log = structlog.get_logger()

BACKOFF_START, BACKOFF_CAP = 0.5, 30.0
STABLE_S = 10.0              # healthy this long: its death is a fault, not a crash loop
STABLE_MIN_S = 1.0           # ...or this long and as long as its start took, if that is less
HEALTH_PERIOD = 1.0          # seconds between health checks
MISSED_CHECKS_TO_KILL = 3    # a service that misses three periods is killed and restarted...
BUSY_CHECKS_TO_KILL = 30     # ...unless it used the CPU meanwhile: busy (a long load holding the
BUSY_CPU_S = 0.05            # GIL on a loaded host), not hung; it gets this many periods
STACKS_WAIT_S = 0.2          # time a hung service gets to write its stacks before the kill
                             # (two were missed by loads holding the GIL on a loaded host)
SECRET_KEY = "x-llmasos-secret"   # services/runtime.py checks it on every call
MAX_SOCKET_PATH = 107            # sun_path holds 108 bytes with its NUL on Linux
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]


class SecretInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the per-boot secret to every call, so callers of the channel need not know it."""

    def __init__(self, secret: str) -> None:
        self.entry = (SECRET_KEY, secret)

    def _with_secret(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self.entry], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_secret(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_secret(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._with_secret(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._with_secret(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def secret_channel(address: str, secret: str) -> grpc.Channel:
    """A channel to a service whose every call carries the secret."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=CHANNEL_OPTIONS),
                                  SecretInterceptor(secret))


@dataclass
class ServiceSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 300.0   # the inference service loads a model before it reports
    module: str = ""               # llmasos.services.<module>; default: the name (a model's
                                   # replicas run the inference module as inference.1, ...)
    listen: str = ""               # default: the Unix socket in the run dir; a node's services
                                   # listen on TCP for their head (kernel/node_agent.py)
    env: dict[str, str] = field(default_factory=dict)   # added to llmosd's environment


@dataclass
class Service:
    spec: ServiceSpec
    state: str = "STOPPED"   # STARTING, HEALTHY, UNHEALTHY, RESTARTING, FAILED, STOPPED
    popen: subprocess.Popen | None = None
    address: str = ""
    channel: grpc.Channel | None = None
    incarnation: int = 0
    restarts: int = 0
    started_at: float = 0.0      # wall clock, for ps
    spawned_at: float = 0.0      # monotonic, for the backoff
    last_exit: str = ""
    missed: int = 0
    next_start: float = 0.0
    recent: collections.deque = field(default_factory=collections.deque)  # restart times
    healthy_at: float = 0.0  # when this incarnation first answered SERVING (0: not yet)
    cpu_s: float = 0.0       # its CPU time at the last missed check
    crash_loop: int = 0      # deaths since an incarnation last ran STABLE_S: the backoff's power

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen and self.popen.poll() is None else 0


def dump_stacks(popen: subprocess.Popen) -> None:
    """Ask a service about to be killed as hung to write every thread's stack to its stderr
    (the kernel's log): the one clue to why it stopped answering."""
    try:
        popen.send_signal(STACKS_SIGNAL)
        time.sleep(STACKS_WAIT_S)
    except ProcessLookupError:
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def hung(missed: int, cpu_gained: float) -> bool:
    """Whether a service that missed `missed` health periods in a row is hung: silent for
    MISSED_CHECKS_TO_KILL periods and idle over the last (`cpu_gained` CPU seconds in it), or
    silent for BUSY_CHECKS_TO_KILL however busy."""
    if missed >= BUSY_CHECKS_TO_KILL:
        return True
    return missed >= MISSED_CHECKS_TO_KILL and cpu_gained < BUSY_CPU_S


def ran_stable(svc: Service, now: float) -> bool:
    """Its death is a fault, not a crash loop: it served at least as long as its start took."""
    if not svc.healthy_at:
        return False
    startup = max(0.0, svc.healthy_at - svc.spawned_at)
    return now - svc.healthy_at >= min(STABLE_S, max(STABLE_MIN_S, startup))


class Supervisor:
    def __init__(self, specs: list[ServiceSpec], state_dir: str, max_restarts: int = 5,
                 window: float = 60.0,
                 on_start: Callable[[Service], None] | None = None,
                 on_exit: Callable[[Service], None] | None = None) -> None:
        self.services = {s.name: Service(s) for s in specs}
        self.state_dir = state_dir
        self.run_dir = Path(state_dir) / "run"
        self.secret = secrets.token_hex(32)   # per boot; only in memory and the services' pipes
        self.run_lock: int = -1
        self.max_restarts, self.window = max_restarts, window
        self.on_start = on_start or (lambda svc: None)
        self.on_exit = on_exit or (lambda svc: None)   # under the lock: it must not block
        self.lock = threading.RLock()
        self.ready = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Launch every service at once (boot time is the slowest service's, not the sum)."""
        self._prepare_run_dir()
        starters = [threading.Thread(target=self._launch, args=(svc,), daemon=True,
                                     name=f"start-{svc.spec.name}")
                    for svc in self.services.values()]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        self.thread.start()

    def _prepare_run_dir(self) -> None:
        """The run dir: ours alone (0700), one llmosd at a time, no sockets left from before."""
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        st = os.lstat(self.run_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SystemExit(f"llmosd: {self.run_dir} is not a directory owned by this user; "
                             "remove it and start again")
        os.chmod(self.run_dir, 0o700)
        longest = max((len(self.socket_path(n)) for n in self.services), default=0)
        if longest > MAX_SOCKET_PATH:
            raise SystemExit(f"llmosd: the state directory {self.state_dir} is too long for a "
                             f"Unix socket path ({longest} > {MAX_SOCKET_PATH} bytes); choose a "
                             "shorter --home or LLMASOS_HOME")
        self.run_lock = os.open(self.run_dir / "llmosd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.run_lock)
            self.run_lock = -1
            raise SystemExit(f"llmosd: another llmosd runs with the state directory "
                             f"{self.state_dir}; stop it or choose another --home") from None
        for entry in self.run_dir.iterdir():
            if entry.name.endswith(".sock"):
                entry.unlink(missing_ok=True)

    def socket_path(self, name: str) -> str:
        return str(self.run_dir / f"{name}.sock")

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.ready:
            while not all(s.state == "HEALTHY" for s in self.services.values()):
                left = deadline - time.monotonic()
                failed = any(s.state == "FAILED" for s in self.services.values())
                if left <= 0 or failed or self.stopping.is_set():
                    return False
                self.ready.wait(min(left, 0.5))
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with self.lock:
            for svc in self.services.values():
                if svc.popen and svc.popen.poll() is None:
                    svc.popen.send_signal(signal.SIGTERM)
            for svc in self.services.values():
                self._reap(svc, timeout)
                svc.state = "STOPPED"
                if svc.channel:
                    svc.channel.close()
                    svc.channel = None
                Path(self.socket_path(svc.spec.name)).unlink(missing_ok=True)
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        if self.run_lock >= 0:
            os.close(self.run_lock)   # releases the flock
            self.run_lock = -1

    def add(self, spec: ServiceSpec, timeout: float) -> bool:
        """Supervise one more service (a model's replica) and wait until it is HEALTHY;
        before start() it only joins the others. False if it did not become healthy."""
        with self.lock:
            if spec.name not in self.services:
                self.services[spec.name] = Service(spec)
            svc = self.services[spec.name]
            if svc.state == "FAILED":   # asked for again: a fresh restart budget
                svc.state = "STOPPED"
                svc.recent.clear()
            if not self.thread.is_alive() or svc.state != "STOPPED":
                return self._wait(svc, timeout) if self.thread.is_alive() else True
            svc.state = "STARTING"
        threading.Thread(target=self._launch, args=(svc,), daemon=True,
                         name=f"start-{spec.name}").start()
        with self.lock:
            return self._wait(svc, timeout)

    def _wait(self, svc: Service, timeout: float) -> bool:
        """Under the lock: wait for the service to be HEALTHY (False: FAILED or timed out)."""
        deadline = time.monotonic() + timeout
        while svc.state != "HEALTHY":
            left = deadline - time.monotonic()
            if left <= 0 or svc.state in ("FAILED", "STOPPED") or self.stopping.is_set():
                return False
            self.ready.wait(min(left, 0.5))
        return True

    def retire(self, name: str, timeout: float = 10.0) -> None:
        """Stop a service and forget it (a replica no model uses any more)."""
        with self.lock:
            svc = self.services.pop(name, None)
            if svc is None:
                return
            svc.state = "STOPPED"
            if svc.popen and svc.popen.poll() is None:
                svc.popen.send_signal(signal.SIGTERM)
            self._reap(svc, timeout)
            if svc.channel:
                svc.channel.close()
                svc.channel = None
        Path(self.socket_path(name)).unlink(missing_ok=True)

    # --- queries ---------------------------------------------------------------------------

    def channel(self, name: str) -> grpc.Channel | None:
        """The live service's channel, or None when it is not serving."""
        svc = self.services[name]
        return svc.channel if svc.state in ("HEALTHY", "UNHEALTHY") else None

    def failed(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if self.services[n].state == "FAILED"]

    # --- starting --------------------------------------------------------------------------

    def _launch(self, svc: Service) -> None:
        """Start one incarnation and read its address from the report pipe. Runs without the
        lock (a model load can take a while) so the other services stay watched meanwhile."""
        read_fd, write_fd = os.pipe()
        secret_r, secret_w = os.pipe()
        os.write(secret_w, self.secret.encode() + b"\n")   # 65 bytes: fits the pipe buffer
        os.close(secret_w)
        cmd = [sys.executable, "-m", f"llmasos.services.{svc.spec.module or svc.spec.name}",
               "--listen", svc.spec.listen or f"unix:{self.socket_path(svc.spec.name)}",
               "--report-fd", str(write_fd), "--secret-fd", str(secret_r),
               "--state-dir", self.state_dir]
        for key, value in svc.spec.options.items():
            cmd += ["--option", f"{key}={value}"]
        with self.lock:   # stop() signals under the lock: never start a child it cannot see
            if self.stopping.is_set():
                for fd in (read_fd, write_fd, secret_r):
                    os.close(fd)
                svc.state = "STOPPED"
                return
            svc.state = "STARTING"
            svc.incarnation += 1
            svc.started_at, svc.spawned_at = time.time(), time.monotonic()
            svc.healthy_at = 0.0
            try:
                svc.popen = subprocess.Popen(cmd, pass_fds=(write_fd, secret_r),
                                             stdin=subprocess.DEVNULL,
                                             env={**os.environ, **svc.spec.env} if svc.spec.env
                                             else None)
            finally:
                os.close(secret_r)
        os.close(write_fd)
        address = self._read_report(read_fd, svc)
        with self.lock:
            if not address:
                self._died(svc, "no address reported")
                return
            svc.address = address
            svc.channel = secret_channel(address, self.secret)
            svc.missed = 0
        log.info("service_started", service=svc.spec.name, pid=svc.popen.pid,
                 address=address, incarnation=svc.incarnation)
        try:
            self.on_start(svc)
        except Exception as e:  # a failing hook is a failed start: restart (budget), not HEALTHY
            log.error("service_start_hook_failed", service=svc.spec.name, error=str(e))
            with self.lock:
                if svc.popen is not None and svc.popen.poll() is None:
                    svc.popen.kill()
                self._died(svc, f"start hook failed: {e}")
            return
        self._check(svc)

    def _read_report(self, fd: int, svc: Service) -> str:
        deadline = time.monotonic() + svc.spec.start_timeout
        data = b""
        try:
            while b"\n" not in data and time.monotonic() < deadline:
                if svc.popen.poll() is not None or self.stopping.is_set():
                    break
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    chunk = os.read(fd, 256)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(fd)
        return data.decode().strip() if b"\n" in data else ""

    # --- watching --------------------------------------------------------------------------

    def _watch(self) -> None:
        last_check = 0.0
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            check = now - last_check >= HEALTH_PERIOD
            with self.lock:
                due = [svc for svc in self.services.values() if self._tick(svc, now, check)]
            for svc in due:   # health RPCs run without the lock: a slow answer blocks no one
                self._check(svc)
            if check:
                last_check = now

    def _tick(self, svc: Service, now: float, check_health: bool) -> bool:
        """Restart or reap as due (under the lock); True when a health check is due."""
        if self.stopping.is_set() or svc.state in ("FAILED", "STOPPED", "STARTING"):
            return False
        if svc.state == "RESTARTING":
            if now >= svc.next_start:
                svc.state = "STARTING"   # its own thread starts it; the rest stay watched
                threading.Thread(target=self._launch, args=(svc,), daemon=True,
                                 name=f"start-{svc.spec.name}").start()
            return False
        code = svc.popen.poll() if svc.popen else -1
        if code is not None:
            self._died(svc, f"exited with status {code}")
            return False
        return check_health

    def _check(self, svc: Service) -> None:
        """Probe one service (the RPC runs unlocked) and record the answer under the lock."""
        with self.lock:
            channel, incarnation = svc.channel, svc.incarnation
        if channel is None:
            return
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_PERIOD)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except (grpc.RpcError, ValueError):   # ValueError: the channel was closed meanwhile
            serving = False
        with self.lock:
            if svc.incarnation == incarnation and svc.channel is channel and \
                    svc.state in ("STARTING", "HEALTHY", "UNHEALTHY"):
                self._record(svc, serving)

    def _record(self, svc: Service, serving: bool) -> None:
        if serving:
            svc.missed = 0
            if svc.state != "HEALTHY":
                svc.state = "HEALTHY"
                svc.healthy_at = svc.healthy_at or time.monotonic()
                self.ready.notify_all()
            return
        cpu = cpu_seconds(svc.popen.pid) if svc.popen else 0.0
        gained, svc.cpu_s = (cpu - svc.cpu_s if svc.missed else 0.0), cpu
        svc.missed += 1
        svc.state = "UNHEALTHY"
        if svc.missed == MISSED_CHECKS_TO_KILL and not hung(svc.missed, gained):
            log.warning("service_busy", service=svc.spec.name, missed=svc.missed,
                        cpu_s=round(gained, 2), patience=BUSY_CHECKS_TO_KILL)
        if hung(svc.missed, gained):
            log.warning("service_unresponsive", service=svc.spec.name, missed=svc.missed)
            dump_stacks(svc.popen)
            svc.popen.kill()
            self._died(svc, f"no health answer in {svc.missed} periods; killed")

    def _died(self, svc: Service, reason: str) -> None:
        """Record the death and schedule a restart, or mark the service FAILED."""
        self._reap(svc, 5.0)
        if svc.channel:
            svc.channel.close()
            svc.channel = None
        svc.last_exit = reason
        if self.stopping.is_set():
            svc.state = "STOPPED"
            return
        try:
            self.on_exit(svc)
        except Exception as e:  # the watch thread must live on
            log.error("service_exit_hook_failed", service=svc.spec.name, error=str(e))
        now = time.monotonic()
        while svc.recent and now - svc.recent[0] > self.window:
            svc.recent.popleft()
        if len(svc.recent) >= self.max_restarts:
            svc.state = "FAILED"
            log.error("service_failed", service=svc.spec.name, reason=reason,
                      restarts=svc.restarts, budget=f"{self.max_restarts} in {self.window}s")
            self.ready.notify_all()
            return
        if ran_stable(svc, now):
            svc.crash_loop = 0
        delay = min(BACKOFF_START * 2 ** (svc.crash_loop - 1), BACKOFF_CAP) \
            if svc.crash_loop else 0.0
        svc.crash_loop += 1
        svc.recent.append(now)
        svc.restarts += 1
        svc.state, svc.next_start = "RESTARTING", now + delay
        log.warning("service_restarting", service=svc.spec.name, reason=reason,
                    incarnation=svc.incarnation + 1, restarts=svc.restarts, backoff_s=delay)

    @staticmethod
    def _reap(svc: Service, timeout: float) -> None:
        if svc.popen is None:
            return
        try:
            svc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            svc.popen.kill()
            svc.popen.wait()
