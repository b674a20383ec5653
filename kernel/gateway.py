"""The HTTP gateway (userland/http) as a child of llmosd: started after boot, restarted with
backoff if it dies, left stopped if it cannot listen (exit 2), stopped at shutdown.
It is a userland client of the kernel, so it runs as its own process, never inside llmosd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import structlog

log = structlog.get_logger()
EXIT_CANNOT_LISTEN = 2
BACKOFF_S, BACKOFF_MAX_S = 1.0, 30.0


class Gateway:
    def __init__(self, listen: str, kernel: str, home: str) -> None:
        self.listen, self.kernel, self.home = listen, kernel, home
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="http-gateway", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "LLMASOS_ADDR": self.kernel, "LLMASOS_HOME": self.home}
        cmd = [sys.executable, "-m", "llmasos.http", "--listen", self.listen,
               "--kernel", self.kernel, "--parent", str(os.getpid())]
        # its own session: a terminal's Ctrl-C reaches llmosd, which stops it in order
        return subprocess.Popen(cmd, env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def _run(self) -> None:
        delay = BACKOFF_S
        while not self.stopping.is_set():
            self.proc = self._spawn()
            log.info("http_started", listen=self.listen, pid=self.proc.pid)
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            if code == EXIT_CANNOT_LISTEN:
                log.error("http_failed", listen=self.listen,
                          hint="address in use? choose one with --http ADDR, or --no-http")
                return
            log.warning("http_died", code=code, restart_in_s=delay)
            if self.stopping.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX_S)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.thread.join(timeout)
