"""`make run`: boot llmosd, wait until it is healthy, open llmsh on it, and shut the system
down when the shell exits.

    python -m llmasos.shell.boot [llmosd run options...]    e.g. --listen 127.0.0.1:7070
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

from llmasos import connect
from llmasos.fmt import error

BOOT_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


def state_dir(argv: list[str]) -> str:
    return argv[argv.index("--home") + 1] if "--home" in argv else str(connect.home())


def start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    """llmosd in the background, its logs in STATE/llmosd.log (not over the shell's screen);
    returns it and its ready address."""
    log_path = os.path.join(state_dir(argv), "llmosd.log")
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    print(f"booting llmosd (logs in {log_path}) ...", file=sys.stderr, flush=True)
    # its own session: the terminal's Ctrl-C is for the shell's job, not for the kernel
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmasos.kernel.main", "run", *argv],
                                stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("llmosd ready"):
                return proc, line.split()[-1]
    stop(proc)
    raise RuntimeError(f"llmosd did not become ready; {log_path} says why")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM and wait, as the kernel's shutdown expects; SIGKILL only past the timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        kernel, addr = start(argv)
    except (RuntimeError, KeyboardInterrupt) as err:
        error("llmsh", str(err) or "interrupted while booting")
        return 1
    env = {**os.environ, "LLMASOS_ADDR": addr}
    if "--home" in argv:
        env["LLMASOS_HOME"] = argv[argv.index("--home") + 1]
    print(f"llmosd is up at {addr} (state in {env.get('LLMASOS_HOME', connect.home())}); "
          "type `help`, `exit` shuts it down", file=sys.stderr)
    try:
        # Ctrl-C is the shell's: a no-op handler (not SIG_IGN, which the shell would inherit)
        previous = signal.signal(signal.SIGINT, lambda *_: None)
        status = subprocess.call([sys.executable, "-m", "llmasos.shell.main"], env=env)
        signal.signal(signal.SIGINT, previous)
    finally:
        stop(kernel)
    return status


if __name__ == "__main__":
    sys.exit(main())
