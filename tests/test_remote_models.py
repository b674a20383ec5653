"""Hosted models through the real daemon: `deploy --remote` names an OpenAI-compatible endpoint
(a tiny one started here on loopback) and its jobs are processes: PIDs, ps, Read, Wait, Kill
(the endpoint sees the connection close), STOP/CONT (resumed with the prompt plus the text so
far), quotas, aliases, the journal across a restart. The API key, given to llmosd in its
environment, never shows in ps, the logs, the audit log or the journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import psutil
import pytest

from llmasos import LLMClient
from llmasos.proto import common_pb2, kernel_pb2

from conftest import System, boot, shutdown

KEY = "sk-remote-models-7f3a9c1e5b"
KEY_ENV = "LLMASOS_TEST_REMOTE_KEY"
PROMPT = "The quick brown fox"
WORDS = [f" w{i}" for i in range(400)]
SHORT = [" jumps", " over", " the", " lazy", " dog", "."]


class Endpoint:
    """/v1/completions that continues PROMPT + any prefix of its words, one word per chunk,
    `delay` seconds apart; it records requests and connections the client closed."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self.closed = threading.Event()   # a client went away mid-stream
        self.delay = 0.0
        self.words = WORDS
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                endpoint.auth.append(self.headers.get("Authorization", ""))
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self.error(401, "bad key")
                if not body["prompt"].startswith(PROMPT):
                    return self.error(400, "this endpoint only continues PROMPT")
                words = endpoint.words
                rest = body["prompt"][len(PROMPT):]
                start = next(i for i in range(len(words) + 1) if "".join(words[:i]) == rest)
                todo = words[start:start + body["max_tokens"]]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i, word in enumerate(todo):
                        last = i == len(todo) - 1
                        reason = ("stop" if start + i == len(words) - 1 else "length") \
                            if last else None
                        event = {"choices": [{"text": word, "index": 0,
                                              "finish_reason": reason}]}
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(endpoint.delay)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    endpoint.closed.set()

            def error(self, code: int, message: str) -> None:
                data = json.dumps({"error": {"message": message}}).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.server.shutdown()
    e.server.server_close()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, endpoint: Endpoint) -> Iterator[System]:
    """llmosd without a local model, with the key in its environment, `gpt` deployed remote."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        system = boot(tmp_path_factory.mktemp("home"), "--no-embedded")
    deploy(system, endpoint, "gpt", remote_model="gpt-3.5-turbo-instruct")
    yield system
    assert shutdown(system) == 0


def deploy(system: System, endpoint: Endpoint, name: str, **kw: str) -> common_pb2.ModelInfo:
    kw.setdefault("api_key_env", KEY_ENV)
    return system.call("Deploy", kernel_pb2.DeployRequest(name=name, remote_url=endpoint.url,
                                                           **kw))


def spawn(system: System, max_tokens: int, token: str | None = None, model: str = "gpt") -> int:
    req = kernel_pb2.SpawnRequest(model=model, prompt=PROMPT,
                                  sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    return system.call("Spawn", req, token=token).pid


def read_until(system: System, pid: int, chars: int) -> str:
    """Read's stream until it has carried at least `chars` characters."""
    text = ""
    for chunk in system.kernel.Read(kernel_pb2.ReadRequest(pid=pid), metadata=system.auth(),
                                    timeout=120):
        text += chunk.text
        if len(text) >= chars or chunk.done:
            return text
    return text


def state_of(system: System, pid: int, want: int) -> kernel_pb2.ProcessInfo:
    for _ in range(600):
        info = system.call("Stat", kernel_pb2.StatRequest(pid=pid))
        if info.state == want:
            return info
        time.sleep(0.1)
    raise AssertionError(f"process {pid} never reached state {want}: {info}")


def test_deploy_lists_the_model_and_spawn_streams_through_read_and_wait(
        system: System, endpoint: Endpoint) -> None:
    models = {m.name: m for m in system.call("Models", kernel_pb2.ModelsRequest()).models}
    assert models["gpt"].device == "remote" and models["gpt"].source == endpoint.url
    endpoint.delay = 0.0
    pid = spawn(system, 5)
    streamed = read_until(system, pid, 10**6)
    reply = system.call("Wait", kernel_pb2.WaitRequest(pid=pid))
    assert streamed == reply.text == "".join(WORDS[:5])
    assert reply.info.exit_reason == common_pb2.EXIT_LENGTH and not reply.token_ids
    assert endpoint.requests[-1]["model"] == "gpt-3.5-turbo-instruct"
    assert endpoint.requests[-1]["temperature"] == 0.0   # unset: greedy, as for local models
    assert endpoint.requests[-1]["prompt"] == PROMPT and endpoint.auth[-1] == f"Bearer {KEY}"


def test_ps_shows_a_running_remote_job_and_kill_closes_the_stream(
        system: System, endpoint: Endpoint) -> None:
    endpoint.delay, endpoint.closed = 0.05, threading.Event()
    pid = spawn(system, 400)
    read_until(system, pid, 12)
    ps = system.call("Ps", kernel_pb2.PsRequest(all=True))
    (job,) = [p for p in ps.processes if p.pid == pid]
    assert job.model == "gpt" and job.state == common_pb2.PROC_RUNNING
    assert KEY not in str(ps)
    system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
    reply = system.call("Wait", kernel_pb2.WaitRequest(pid=pid))
    assert reply.info.exit_reason == common_pb2.EXIT_KILLED
    assert endpoint.closed.wait(60), "the endpoint never saw the connection close"
    assert len(reply.text) < len("".join(WORDS))


def test_stop_then_cont_resumes_with_the_text_so_far(system: System,
                                                     endpoint: Endpoint) -> None:
    endpoint.delay = 0.05
    pid = spawn(system, 60)
    read_until(system, pid, 12)
    n = len(endpoint.requests)
    system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=19))
    state_of(system, pid, common_pb2.PROC_STOPPED)
    endpoint.delay = 0.0
    system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=18))
    reply = system.call("Wait", kernel_pb2.WaitRequest(pid=pid))
    assert reply.text == "".join(WORDS[:60]) and reply.info.exit_reason == common_pb2.EXIT_LENGTH
    resumed = endpoint.requests[n:]
    assert len(resumed) == 1, "CONT asks once more"
    so_far = resumed[0]["prompt"][len(PROMPT):]
    assert resumed[0]["prompt"].startswith(PROMPT) and so_far and reply.text.startswith(so_far)
    assert resumed[0]["max_tokens"] == 60 - so_far.count(" w")   # the budget left


def test_quota_counts_remote_jobs(system: System, endpoint: Endpoint) -> None:
    token = system.adduser("alice")
    system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="alice", max_jobs=1))
    endpoint.delay = 0.05
    first = spawn(system, 400, token=token)
    with pytest.raises(grpc.RpcError) as e:
        spawn(system, 400, token=token)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    system.call("Kill", kernel_pb2.KillRequest(pid=first, signal=9), token=token)
    system.call("Wait", kernel_pb2.WaitRequest(pid=first), token=token)


def test_the_founding_example_through_an_alias(system: System, endpoint: Endpoint) -> None:
    endpoint.delay, endpoint.words = 0.0, SHORT
    try:
        system.call("Alias", kernel_pb2.AliasRequest(name="gpt3", target="gpt"))
        with LLMClient(model_name="gpt3", address=system.address,
                       token=system.root_token) as client:
            assert client.generate_text(prompt="The quick brown fox") == "".join(SHORT)
    finally:
        endpoint.words = WORDS


def test_chat_messages_are_sent_as_role_lines(system: System, endpoint: Endpoint) -> None:
    endpoint.delay = 0.0
    msgs = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    pid = system.call("Spawn", kernel_pb2.SpawnRequest(
        model="gpt", messages=msgs, sampling=common_pb2.SamplingParams(max_tokens=3))).pid
    reply = system.call("Wait", kernel_pb2.WaitRequest(pid=pid))
    assert endpoint.requests[-1]["prompt"] == "user: hi\nassistant:"
    assert reply.info.exit_reason == common_pb2.EXIT_ERROR   # the endpoint refused it (400):
    assert "INVALID_ARGUMENT" in reply.info.exit_message     # its reason is the job's


def test_llmsh_deploys_a_hosted_model_and_runs_it(system: System, endpoint: Endpoint) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")},
           "LLMASOS_ADDR": system.address,
           "LLMASOS_HOME": str(system.home), "LLMASOS_TOKEN": system.root_token}

    def llmsh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", line],
                              capture_output=True, text=True, env=env, timeout=120)

    out = llmsh(f"deploy --remote {endpoint.url} --api-key-env {KEY_ENV} "
                "--remote-model gpt-3.5-turbo-instruct hosted")
    assert out.returncode == 0 and f"hosted at {endpoint.url}" in out.stdout, out.stderr
    assert "hosted" in llmsh("models").stdout
    endpoint.delay = 0.0
    out = llmsh(f"run -m hosted -n 4 '{PROMPT}'")
    assert out.returncode == 0 and "".join(WORDS[:4]) in out.stdout, out.stderr
    assert llmsh("undeploy hosted").returncode == 0


def test_key_sources_are_checked_at_deploy(system: System, endpoint: Endpoint,
                                           tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as e:
        deploy(system, endpoint, "nokey", api_key_env="LLMASOS_TEST_UNSET_VAR")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "LLMASOS_TEST_UNSET_VAR" in e.value.details()
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    with pytest.raises(grpc.RpcError) as e:
        deploy(system, endpoint, "filekey", api_key_env="", api_key_file=str(key_file))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "chmod 600" in \
        e.value.details()
    key_file.chmod(0o600)
    deploy(system, endpoint, "filekey", api_key_env="", api_key_file=str(key_file))
    endpoint.delay = 0.0
    pid = spawn(system, 3, model="filekey")
    assert system.call("Wait", kernel_pb2.WaitRequest(pid=pid)).text == "".join(WORDS[:3])
    system.call("Undeploy", kernel_pb2.UndeployRequest(name="filekey"))
    names = [m.name for m in system.call("Models", kernel_pb2.ModelsRequest()).models]
    assert "filekey" not in names and "gpt" in names


def test_a_restart_resumes_remote_jobs_and_the_key_is_nowhere(
        system: System, endpoint: Endpoint) -> None:
    """Last in this module: the system is stopped and booted again from its journal."""
    endpoint.delay = 0.05
    pid = spawn(system, 80)
    read_until(system, pid, 12)
    children = psutil.Process(system.proc.pid).children(recursive=True)
    system.proc.kill()   # kill -9: the journal holds the job and its text so far
    system.proc.wait(30)
    system.channel.close()
    _, alive = psutil.wait_procs(children, timeout=120)   # its services exit by themselves
    assert not alive, f"services outlived the kernel: {[p.pid for p in alive]}"
    endpoint.delay = 0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        again = boot(system.home, "--no-embedded")
    try:
        reply = again.call("Wait", kernel_pb2.WaitRequest(pid=pid))
        assert reply.text == "".join(WORDS[:80])
        assert endpoint.requests[-1]["prompt"] != PROMPT   # asked again from the text so far
        assert KEY not in str(again.call("Ps", kernel_pb2.PsRequest(all=True)))
        leaks = [str(f) for f in again.home.rglob("*") if f.is_file() and not f.is_symlink()
                 and "cache" not in f.parts and KEY.encode() in f.read_bytes()]
        assert not leaks, f"the key was written to {leaks}"
        assert (again.home / "journal.sqlite").exists() and (again.home / "audit.log").exists()
    finally:
        assert shutdown(again) == 0
        system.proc, system.channel = again.proc, again.channel   # already shut down
