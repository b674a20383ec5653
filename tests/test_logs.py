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
