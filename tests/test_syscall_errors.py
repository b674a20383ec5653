"""Bad input on every syscall gives the right status — never INTERNAL, a crash or a hang."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmasos.proto import common_pb2, kernel_pb2
from llmasos.syscalls import BY_NAME

from conftest import System

IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
K = kernel_pb2
BIG = 2**63

CASES = [
    ("Spawn", K.SpawnRequest(), IA),                                    # nothing at all
    ("Spawn", K.SpawnRequest(model="smollm2-135m"), IA),                # no prompt
    ("Spawn", K.SpawnRequest(model="", prompt="hi"), IA),
    ("Spawn", K.SpawnRequest(model="no-such-model", prompt="hi"), NF),
    ("Spawn", K.SpawnRequest(model="m", prompt="x" * 1_000_001), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi", nice=20), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi", nice=-21), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi", n=17), IA),
    ("Spawn", K.SpawnRequest(model="m", messages=common_pb2.ChatMessages()), IA),
    ("Spawn", K.SpawnRequest(model="m", messages=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="robot", content="x")])), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi",
                             sampling=common_pb2.SamplingParams(temperature=-1)), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi",
                             sampling=common_pb2.SamplingParams(top_p=0)), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi",
                             sampling=common_pb2.SamplingParams(max_tokens=0)), IA),
    ("Spawn", K.SpawnRequest(model="m", prompt="hi",
                             sampling=common_pb2.SamplingParams(stop=[""])), IA),
    ("Wait", K.WaitRequest(), IA),
    ("Wait", K.WaitRequest(pid=BIG), NF),
    ("Read", K.ReadRequest(), IA),
    ("Read", K.ReadRequest(pid=424242), NF),
    ("Kill", K.KillRequest(pid=1), IA),                                 # no signal
    ("Kill", K.KillRequest(pid=1, signal=2), IA),                       # unknown signal
    ("Kill", K.KillRequest(pid=424242, signal=15), NF),
    ("Kill", K.KillRequest(signal=9), IA),
    ("Nice", K.NiceRequest(pid=1, nice=99), IA),
    ("Nice", K.NiceRequest(pid=424242, nice=1), NF),
    ("Stat", K.StatRequest(), IA),
    ("Stat", K.StatRequest(pid=BIG), NF),
    ("Deploy", K.DeployRequest(), IA),
    ("Deploy", K.DeployRequest(name="x"), IA),
    ("Deploy", K.DeployRequest(name="bad name", path="/tmp"), IA),
    ("Deploy", K.DeployRequest(name="x", path="/no/such/file.gguf"), NF),
    ("Deploy", K.DeployRequest(name="x", path="/tmp", dtype="int3"), IA),
    ("Undeploy", K.UndeployRequest(), IA),
    ("Undeploy", K.UndeployRequest(name="ghost"), NF),
]
CASES += [("DeployStream", r, c) for n, r, c in CASES if n == "Deploy"]   # the same checks


def call(system: System, name: str, request: object) -> grpc.StatusCode:
    try:
        reply = getattr(system.kernel, name)(request, metadata=system.auth(), timeout=60)
        if BY_NAME[name].stream:
            list(reply)
    except grpc.RpcError as e:
        assert e.details(), f"{name}: an error must say what is wrong"
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("name", "request_", "code"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_the_right_code(bare_system: System, name: str, request_: object,
                                       code: grpc.StatusCode) -> None:
    assert call(bare_system, name, request_) == code


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}

texts = st.text(max_size=80)
ints = st.integers(min_value=0, max_value=2**64 - 1)
sints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
sampling = st.builds(
    common_pb2.SamplingParams,
    temperature=st.floats(-5, 20) | st.just(float("nan")), top_p=st.floats(-1, 2),
    top_k=st.integers(-5, 10**6), max_tokens=st.integers(0, 10**6),
    stop=st.lists(st.text(max_size=300), max_size=20))
requests = st.one_of(
    st.tuples(st.just("Spawn"), st.builds(K.SpawnRequest, model=texts, prompt=texts,
                                           nice=sints, n=st.integers(0, 100), name=texts,
                                           sampling=sampling)),
    st.tuples(st.just("Wait"), st.builds(K.WaitRequest, pid=ints,
                                         timeout_ms=st.integers(0, 50))),
    st.tuples(st.just("Read"), st.builds(K.ReadRequest, pid=ints)),
    st.tuples(st.just("Kill"), st.builds(K.KillRequest, pid=ints,
                                         signal=st.sampled_from([0, 9, 15, 18, 19])
                                         | st.integers(0, 1000))),
    st.tuples(st.just("Nice"), st.builds(K.NiceRequest, pid=ints, nice=sints)),
    st.tuples(st.just("Stat"), st.builds(K.StatRequest, pid=ints)),
    st.tuples(st.just("Ps"), st.builds(K.PsRequest, all=st.booleans(), user=texts)),
    st.tuples(st.sampled_from(["Deploy", "DeployStream"]),
              st.builds(K.DeployRequest, path=texts, name=texts, dtype=texts)),
    st.tuples(st.just("Undeploy"), st.builds(K.UndeployRequest, name=texts)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests)
def test_generated_requests_never_break_the_kernel(bare_system: System, case: tuple) -> None:
    name, request = case
    code = call(bare_system, name, request)
    assert code in ALLOWED, f"{name}({request}) → {code}"
    assert call(bare_system, "WhoAmI", K.WhoAmIRequest()) == grpc.StatusCode.OK
