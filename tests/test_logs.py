"""--log-level / LLMASOS_LOG_LEVEL: one setting for the kernel and the services it starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmasos.kernel import log


def test_level_names_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMASOS_LOG_LEVEL", raising=False)
    assert log.level_of(None) == 20
    monkeypatch.setenv("LLMASOS_LOG_LEVEL", "WARNING")
    assert log.level_of(None) == 30
    assert log.level_of("debug") == 10   # the flag wins over the environment
    with pytest.raises(SystemExit, match="unknown log level"):
        log.level_of("loud")


def test_llmosd_refuses_an_unknown_level(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "run", "--log-level",
                          "loud", "--home", str(tmp_path), "--no-embedded", "--no-http",
                          "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "unknown log level 'loud'" in out.stderr


def test_services_share_the_kernels_configuration() -> None:
    """A service logs through kernel/log.py's set-up: the level llmosd exported, JSON lines
    that name the service and its pid, from any thread (gRPC handlers run on a pool)."""
    import json
    import os
    code = ("import threading; from llmasos.services.runtime import configure_logging; "
            "import structlog; log = configure_logging('sched'); log.info('quiet'); "
            "t = threading.Thread(target=lambda: structlog.get_logger().warning('loud', n=1)); "
            "t.start(); t.join(); print(__import__('os').getpid())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "LLMASOS_LOG_LEVEL": "warning"})
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["loud"]   # info is below the exported level
    assert lines[0]["service"] == "sched" and lines[0]["pid"] == int(out.stdout)
    assert lines[0]["level"] == "warning" and lines[0]["n"] == 1 and "timestamp" in lines[0]
