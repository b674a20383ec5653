"""The inference service as a real process: boot with the embedded model, then Tokenize,
Geometry, Step and the error codes over gRPC."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmasos.proto import common_pb2, inference_pb2, inference_pb2_grpc
from llmasos.services.inference.__main__ import embedded_path

from conftest import converting_once, shared_state, start_service

MODEL = "smollm2-135m"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[inference_pb2_grpc.InferenceStub]:
    state = shared_state(tmp_path_factory.mktemp("state"))
    with converting_once():   # the runtime reports its address once the model is loaded
        svc = start_service("llmasos.services.inference", "--state-dir", str(state),
                            "--option", "kv_budget_mb=64", "--option", "embedded=1",
                            env={**os.environ, "LLMASOS_HOME": str(state)}, timeout=600)
    proc = svc.proc
    try:
        channel = svc.channel()
        grpc.channel_ready_future(channel).result(timeout=30)
        yield inference_pb2_grpc.InferenceStub(channel)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_boot_lists_embedded_model(stub: inference_pb2_grpc.InferenceStub) -> None:
    (info,) = stub.ListModels(inference_pb2.ListModelsRequest()).models
    assert (info.name, info.architecture, info.vocab_size) == (MODEL, "llama", 49152)
    geo = stub.Geometry(inference_pb2.GeometryRequest(model=MODEL))
    assert geo.block_size == 16 and geo.num_blocks == (64 << 20) // geo.block_bytes
    assert (geo.num_layers, geo.kv_heads, geo.head_dim, geo.dtype) == (30, 3, 64, "float32")


def test_tokenize_step_detokenize(stub: inference_pb2_grpc.InferenceStub) -> None:
    tok = stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, messages=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="user", content="Say hello.")])))
    assert 2 in tok.eos_token_ids and tok.context_length == 8192
    ids = list(tok.token_ids)
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    entry = inference_pb2.StepEntry(seq_id=42, token_ids=ids, start_pos=0,
                                    block_table=[5, 6, 7], sample=True, sampling=params,
                                    reset=True)
    tokens, text = [], ""
    for _ in range(6):
        resp = stub.Step(inference_pb2.StepRequest(model=MODEL, entries=[entry]))
        (r,) = resp.results
        assert r.seq_id == 42 and r.sampled and resp.compute_ms > 0
        tokens.append(r.token_id)
        text += r.text
        if r.finish_reason == common_pb2.EXIT_STOP:
            break
        entry = inference_pb2.StepEntry(seq_id=42, token_ids=[r.token_id],
                                        start_pos=entry.start_pos + len(entry.token_ids),
                                        block_table=[5, 6, 7], sample=True, sampling=params)
    full = stub.Detokenize(inference_pb2.DetokenizeRequest(model=MODEL, token_ids=tokens)).text
    assert text and full.startswith(text)
    stub.Release(inference_pb2.ReleaseRequest(model=MODEL, seq_ids=[42]))


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_error_codes(stub: inference_pb2_grpc.InferenceStub, tmp_path: Path) -> None:
    bad = common_pb2.SamplingParams(temperature=-1.0)
    good = common_pb2.SamplingParams(temperature=0.0)
    reply = stub.Step(inference_pb2.StepRequest(model=MODEL, entries=[   # only its entry fails
        inference_pb2.StepEntry(seq_id=1, token_ids=[1], block_table=[0], sample=True,
                                sampling=bad),
        inference_pb2.StepEntry(seq_id=2, token_ids=[1], block_table=[1], sample=True,
                                sampling=good)]))
    assert "temperature" in reply.results[0].error and not reply.results[0].sampled
    assert not reply.results[1].error and reply.results[1].sampled
    stub.Release(inference_pb2.ReleaseRequest(model=MODEL, seq_ids=[2]))
    code, msg = code_of(lambda: stub.Step(inference_pb2.StepRequest(model=MODEL, entries=[
        inference_pb2.StepEntry(seq_id=3, token_ids=[1], block_table=[0]),
        inference_pb2.StepEntry(seq_id=3, token_ids=[1], block_table=[0])])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in msg   # the kernel's bug
    code, _ = code_of(lambda: stub.Tokenize(inference_pb2.TokenizeRequest(model="nope",
                                                                         text="hi")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: stub.LoadModel(inference_pb2.LoadModelRequest(
        name="x", path=str(tmp_path / "missing.gguf"))))
    assert code == grpc.StatusCode.NOT_FOUND
    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    code, msg = code_of(lambda: stub.LoadModel(inference_pb2.LoadModelRequest(
        name="phi", path=str(folder))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "phi3" in msg
    code, _ = code_of(lambda: stub.LoadModel(inference_pb2.LoadModelRequest(
        name="huge", path=embedded_path(), kv_budget_bytes=1 << 50)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [m.name for m in stub.ListModels(inference_pb2.ListModelsRequest()).models] == [MODEL]
