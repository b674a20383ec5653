"""Model aliases end to end through a real llmosd: `alias gpt3 smollm2-135m` makes the founding
example work, `llmsh alias` sets and lists them, and bad requests get the right codes."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from llmasos import LLMClient
from llmasos.proto import kernel_pb2

from conftest import MODEL, System, greedy, wait

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}
pytestmark = pytest.mark.slow


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_founding_example_through_an_alias(model_system: System) -> None:
    system = model_system
    system.call("Alias", kernel_pb2.AliasRequest(name="gpt3", target=MODEL))
    models = system.call("Models", kernel_pb2.ModelsRequest())
    assert [(a.name, a.target) for a in models.aliases] == [("gpt3", MODEL)]
    client = LLMClient(model_name="gpt3", address=system.address, token=system.root_token)
    text = client.generate_text(prompt="The quick brown fox", max_tokens=8, temperature=0.0)
    assert text.strip()
    # the same job as on the target's own name, and ps names the model that ran it
    pid = system.call("Spawn", kernel_pb2.SpawnRequest(model="gpt3", prompt="The quick brown fox",
                                                      sampling=greedy(8))).pid
    info = wait(system, pid)
    assert info.info.model == MODEL and info.text == text
    # repointing and removing take effect at the next Spawn
    system.call("Alias", kernel_pb2.AliasRequest(name="gpt3", target=""))
    code, msg = code_of(lambda: system.call("Spawn", kernel_pb2.SpawnRequest(
        model="gpt3", prompt="hi", sampling=greedy(2))))
    assert code == grpc.StatusCode.NOT_FOUND and "gpt3" in msg
    assert (system.home / "aliases.json").read_text() == "{}"


def test_alias_errors(model_system: System) -> None:
    system = model_system
    code, msg = code_of(lambda: system.call("Alias", kernel_pb2.AliasRequest(
        name="gpt3", target="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    code, _ = code_of(lambda: system.call("Alias", kernel_pb2.AliasRequest(
        name=MODEL, target=MODEL)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = code_of(lambda: system.call("Alias", kernel_pb2.AliasRequest(
        name="bad name!", target=MODEL)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(lambda: system.call("Alias", kernel_pb2.AliasRequest(name="never")))
    assert code == grpc.StatusCode.NOT_FOUND
    user = system.adduser("alice")
    code, _ = code_of(lambda: system.call("Alias", kernel_pb2.AliasRequest(
        name="gpt3", target=MODEL), token=user))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_llmsh_alias(model_system: System) -> None:
    env = {**CLEAN_ENV, "LLMASOS_ADDR": model_system.address,
           "LLMASOS_HOME": str(model_system.home), "LLMASOS_TOKEN": model_system.root_token}

    def llmsh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", line],
                              capture_output=True, text=True, env=env, timeout=120)

    assert llmsh(f"alias jurassic {MODEL}").returncode == 0
    listed = llmsh("alias")
    assert listed.returncode == 0 and f"jurassic -> {MODEL}" in listed.stdout
    assert f"jurassic -> {MODEL} (alias)" in llmsh("models").stdout
    assert llmsh("alias -d jurassic").returncode == 0
    assert "jurassic" not in llmsh("alias").stdout
    bad = llmsh("alias jurassic nope")
    assert bad.returncode != 0 and "nope" in bad.stderr
