"""A client-only install (`pip install llmasos`, no server extra) into a fresh venv: it imports
llmasos and runs the tools without torch, because userland never imports the server's code."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_client_only_install_has_no_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(ROOT)], check=True,
                   env=env, timeout=900, cwd=tmp_path)
    missing = subprocess.run([str(py), "-c", "import torch"], capture_output=True, env=env,
                             cwd=tmp_path)
    assert missing.returncode != 0, "a client-only install must not pull torch"
    probe = ("import sys, llmasos, llmasos.shell.main, llmasos.tools.ps, llmasos.tools.top; "
             "from llmasos import LLMClient; "
             "heavy = sorted(m for m in ('torch', 'gguf', 'llmasos.drivers', "
             "'llmasos.kernel', 'llmasos.services') if m in sys.modules); "
             "print(heavy)")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    daemon = subprocess.run([str(env_dir / "bin" / "llmosd"), "run"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=60)
    assert daemon.returncode == 1 and "llmasos[server]" in daemon.stderr, daemon.stderr
    compress = subprocess.run([str(env_dir / "bin" / "llmsh"), "-c", "compress x --out y "
                               "--method layers --ratio 0.5"], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)
    assert compress.returncode == 1 and "llmasos[server]" in compress.stderr, compress.stderr
    for tool in ("llm-ps", "llm-kill", "llm-top", "llmsh", "llmosd"):
        version = subprocess.run([str(env_dir / "bin" / tool), "--version"],
                                 capture_output=True, text=True, env=env, cwd=tmp_path)
        assert version.returncode == 0, version.stderr
        assert "llmasos" in version.stdout, version.stdout


def test_every_command_has_version() -> None:
    for module in ("llmasos.kernel.main", "llmasos.http"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "llmasos" in out.stdout


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """setuptools installs only the packages named in pyproject.toml: a folder left out works in
    an editable install and is missing from a wheel (drivers/parallel once was)."""
    import tomllib
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(conf["packages"]), conf["package-dir"]
    on_disk = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if not any(p.startswith(".") or p == "node_modules" for p in parts):
                on_disk.add(".".join((package, *parts)))
    assert on_disk <= listed, sorted(on_disk - listed)
