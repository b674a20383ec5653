"""gRPC from another language: tests/node/client.test.js (@grpc/grpc-js, @grpc/proto-loader,
the .proto files as they stand) against a real llmosd: Spawn, Read, Wait, Ps, Kill, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PROMPTS, System, alone

pytestmark = pytest.mark.slow
NODE_DIR = Path(__file__).resolve().parent / "node"


def node_modules() -> None:
    """`make test` installs them; a bare pytest run installs them the same way."""
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not found: install Node.js and npm to run the Node.js client test")
    subprocess.run([npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
                   check=True, timeout=600)


@pytest.mark.skipif(shutil.which("node") is None,
                    reason="node not found: install Node.js to run the Node.js client test")
def test_node_client_against_the_real_daemon(model_system: System) -> None:
    node_modules()
    out = subprocess.run(["node", str(NODE_DIR / "client.test.js"), model_system.address,
                          model_system.root_token], capture_output=True, text=True,
                         timeout=600, env={"LLMASOS_PROMPT": PROMPTS[0],
                                           "PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["token_ids"] == alone(model_system, PROMPTS[0], 8)   # same greedy tokens
    assert seen["statuses"] == {"unknownModel": 5, "badPid": 3, "badToken": 16}
