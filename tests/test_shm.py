"""Named KV segments (shared memory) through the real daemon: a job attached to a segment gives
the same greedy output as one given the prefix as text, allocates no block for the shared part,
and only permitted users attach."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from llmasos.proto import common_pb2, kernel_pb2

from conftest import MODEL, System, assert_no_kv_held, greedy, wait

DOC = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
       "France. It is named after the engineer Gustave Eiffel, whose company designed and "
       "built the tower from 1887 to 1889. ") * 6
OWNER, ALL = kernel_pb2.MBOX_MODE_OWNER, kernel_pb2.MBOX_MODE_ALL


@pytest.fixture(autouse=True)
def no_leaked_blocks(model_system: System) -> Iterator[None]:
    yield
    for seg in model_system.call("ShmList", kernel_pb2.ShmListRequest()).segments:
        if not seg.removed:
            model_system.call("ShmRemove", kernel_pb2.ShmRemoveRequest(name=seg.name))
    assert_no_kv_held(model_system)


def create(system: System, name: str, mode: int = OWNER, token: str | None = None
           ) -> kernel_pb2.ShmInfo:
    return system.call("ShmCreate", kernel_pb2.ShmCreateRequest(
        name=name, model=MODEL, text=DOC, mode=mode), token=token, timeout=300)


def spawn(system: System, prompt: str, max_tokens: int, shm: str = "",
          token: str | None = None, **extra: object) -> int:
    return system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt=prompt, shm=shm, sampling=greedy(max_tokens, **extra)),
        token=token).pid


def test_attached_job_equals_the_prefix_given_as_text(model_system: System) -> None:
    info = create(model_system, "doc")
    assert info.tokens > 100 and info.blocks == -(-info.tokens // 16)
    question = "\nQuestion: who designed the tower?\nAnswer:"
    as_text = wait(model_system, spawn(model_system, DOC + question, 12))
    attached = wait(model_system, spawn(model_system, question, 12, shm="doc"))
    assert list(attached.token_ids) == list(as_text.token_ids)
    assert attached.info.shm == "doc"


def test_sixteen_attached_jobs_share_the_segments_blocks(model_system: System) -> None:
    info = create(model_system, "shared")
    pids = [spawn(model_system, f"\nFact {i}:", 60, shm="shared", ignore_eos=True)
            for i in range(16)]
    used, seen = 0, False
    while not seen:
        ps = model_system.call("Ps", kernel_pb2.PsRequest(all=True))
        mine = [p for p in ps.processes if p.pid in pids]
        if all(p.generated_tokens >= 1 for p in mine) and all(
                p.state != common_pb2.PROC_ZOMBIE for p in mine):
            used, seen = ps.kv.total_blocks - ps.kv.free_blocks, True
        elif any(p.state == common_pb2.PROC_ZOMBIE for p in mine):
            pytest.fail("a job ended before all sixteen were resident")
        time.sleep(0.02)
    private = 16 * info.blocks   # what sixteen private copies of the prefix would take
    # the segment's blocks once, and each job's own few (prompt + output, one copied block)
    assert used <= info.blocks + 16 * 8, (used, info.blocks)
    assert used < private / 4
    listed = model_system.call("ShmList", kernel_pb2.ShmListRequest()).segments[0]
    assert set(listed.attached) == set(pids)
    for pid in pids:
        model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
        wait(model_system, pid)


def test_only_permitted_users_attach(model_system: System) -> None:
    eve = model_system.adduser("eve")
    create(model_system, "private", OWNER)
    with pytest.raises(grpc.RpcError) as err:
        spawn(model_system, "\nQ:", 4, shm="private", token=eve)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [s.name for s in model_system.call(
        "ShmList", kernel_pb2.ShmListRequest(), token=eve).segments] == []
    with pytest.raises(grpc.RpcError) as err:
        model_system.call("ShmRemove", kernel_pb2.ShmRemoveRequest(name="private"), token=eve)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    create(model_system, "public", ALL)
    reply = wait(model_system, spawn(model_system, "\nQ: where is it?\nA:", 6, shm="public",
                                     token=eve), token=eve)
    assert reply.info.exit_reason in (common_pb2.EXIT_LENGTH, common_pb2.EXIT_STOP)
    with pytest.raises(grpc.RpcError) as err:
        spawn(model_system, "\nQ:", 4, shm="nosuch")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_removal_waits_for_the_last_attached_job(model_system: System) -> None:
    create(model_system, "doomed")
    pid = spawn(model_system, "\nSummary:", 300, shm="doomed", ignore_eos=True)
    holder = next(p for p in model_system.call("Ps", kernel_pb2.PsRequest(all=True)).processes
                  if p.name == "shm:doomed")
    with pytest.raises(grpc.RpcError) as err:   # the holder is not killed by hand
        model_system.call("Kill", kernel_pb2.KillRequest(pid=holder.pid, signal=9))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = model_system.call("ShmRemove", kernel_pb2.ShmRemoveRequest(name="doomed"))
    assert info.removed and list(info.attached) == [pid]
    with pytest.raises(grpc.RpcError) as err:   # no new attach
        spawn(model_system, "\nQ:", 4, shm="doomed")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
    wait(model_system, pid)   # the last one gone: the holder ends, its blocks are freed


def test_client_and_llmsh_segments(model_system: System) -> None:
    import os
    import subprocess
    import sys

    from llmasos import LLMClient
    client = LLMClient(model_name=MODEL, address=model_system.address,
                       token=model_system.root_token)
    info = client.shm_create("notes", DOC, mode="all")
    assert info.tokens > 100 and [s.name for s in client.shm_list()] == ["notes"]
    question = "\nQuestion: who designed the tower?\nAnswer:"
    assert client.generate_text(question, max_tokens=8, temperature=0.0, shm="notes") == \
        client.generate_text(DOC + question, max_tokens=8, temperature=0.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}
    env.update(LLMASOS_ADDR=model_system.address, LLMASOS_TOKEN=model_system.root_token)
    out = subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c",
                          "shm tips --mode owner Always answer briefly.; ipcs; ipcrm -s tips"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "segment tips:" in out.stdout and "SEGMENT" in out.stdout and "notes" in out.stdout
    assert [s.name for s in client.shm_list() if not s.removed] == ["notes"]
    client.shm_remove("notes")
