"""The OpenAI-compatible API, through the official `openai` package (unmodified), against a
real llmosd with its HTTP gateway: chat and completions, streamed and not, n, stop strings,
logprobs, errors in OpenAI's shape, a disconnect that kills the job, /metrics, and one caller's
concurrent streams read over one Poll stream."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmasos import LLMClient
from llmasos.proto import common_pb2, kernel_pb2

from conftest import MODEL, System, boot, free_port, shutdown

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


class HTTP:
    def __init__(self, system: System, base: str) -> None:
        self.system, self.base = system, base

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or self.system.root_token,
                             max_retries=0, timeout=300)

    def llm(self) -> LLMClient:
        return LLMClient(model_name=MODEL, address=self.system.address,
                         token=self.system.root_token, job_timeout=300)

    def scrape(self) -> dict[str, list]:
        text = httpx.get(f"{self.base}/metrics", timeout=60).text
        return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTP]:
    listen = f"127.0.0.1:{free_port()}"
    system = boot(tmp_path_factory.mktemp("home"), "--http", listen)
    base = f"http://{listen}"
    deadline = time.monotonic() + 120
    while True:   # the gateway starts after the kernel's ready line
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, system.log_text()[-3000:]
        time.sleep(0.2)
    yield HTTP(system, base)
    assert shutdown(system) == 0


def test_models_lists_the_embedded_model(http: HTTP) -> None:
    ids = [m.id for m in http.client().models.list()]
    assert MODEL in ids
    assert http.client().models.retrieve(MODEL).id == MODEL


def test_chat_greedy_equals_llmclient(http: HTTP) -> None:
    reply = http.client().chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    with http.llm() as llm:
        expected = llm.chat(MESSAGES, max_tokens=12, temperature=0)
    assert choice.message.content == expected
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_greedy_equals_llmclient(http: HTTP) -> None:
    reply = http.client().completions.create(model=MODEL, prompt=PROMPT, temperature=0,
                                             max_tokens=10)
    with http.llm() as llm:
        expected = llm.generate_text(PROMPT, max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10


def test_streamed_chat_equals_whole_reply_and_ends_with_usage(http: HTTP) -> None:
    client = http.client()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                           max_tokens=12)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_ends_with_done(http: HTTP) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 8,
            "stream": True}
    with httpx.stream("POST", f"{http.base}/v1/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {http.system.root_token}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join(c.choices[0].text for c in http.client().completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, stream=True))
    with http.llm() as llm:
        assert text == llm.generate_text(PROMPT, max_tokens=8, temperature=0)


def test_n_gives_that_many_choices(http: HTTP) -> None:
    reply = http.client().completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=1.0,
                                             seed=7, max_tokens=6)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == 12
    chat = http.client().chat.completions.create(model=MODEL, messages=MESSAGES, n=2,
                                                 temperature=0, max_tokens=6, stream=True)
    seen = {c.choices[0].index for c in chat if c.choices}
    assert seen == {0, 1}


def test_stop_string_ends_the_text_before_it(http: HTTP) -> None:
    client = http.client()
    free = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=16)
    text = free.choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=16,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_logprobs_come_per_token(http: HTTP) -> None:
    reply = http.client().chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                  max_tokens=6, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(t.logprob <= 0.0 for t in content)
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    text = http.client().completions.create(model=MODEL, prompt=PROMPT, temperature=0,
                                            max_tokens=6, logprobs=1)
    assert len(text.choices[0].logprobs.token_logprobs) == 6


def test_wrong_key_is_401(http: HTTP) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        http.client("not-a-token").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert err.value.status_code == 401
    r = httpx.get(f"{http.base}/v1/models", timeout=30)   # no key at all
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(http: HTTP) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        http.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"
    assert "smollm2-135m" in err.value.message   # it names what is deployed


@pytest.mark.parametrize("bad", [{"temperature": 5}, {"max_tokens": 0}, {"n": 99},
                                 {"top_p": "high"}, {"stop": [1]}, {"logit_bias": {"1": 5}}])
def test_bad_parameter_is_400_naming_it(http: HTTP, bad: dict) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        http.client().chat.completions.create(model=MODEL, messages=MESSAGES, **bad)
    assert err.value.status_code == 400
    assert err.value.param == next(iter(bad))


def test_malformed_messages_are_400(http: HTTP) -> None:
    r = httpx.post(f"{http.base}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {http.system.root_token}"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def jobs_named(http: HTTP, name: str) -> list[kernel_pb2.ProcessInfo]:
    ps = http.system.call("Ps", kernel_pb2.PsRequest(all=True))
    return [p for p in ps.processes if p.name == name]


def test_disconnect_kills_the_job(http: HTTP) -> None:
    """The job shows in ps under the HTTP client's name; dropping the connection kills it."""
    agent = "disconnect-test/1.0"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {http.system.root_token}", "User-Agent": agent}
    with httpx.Client(timeout=300) as client, \
            client.stream("POST", f"{http.base}/v1/completions", json=body,
                          headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()   # held: a closed line iterator would close the connection
        for line in lines:
            if '"text": "' in line and '"text": ""' not in line:
                break   # generation has begun
        live = jobs_named(http, f"http:{agent}")
        assert len(live) == 1 and live[0].state != common_pb2.PROC_ZOMBIE
    # The connection is closed: the gateway must kill the job (it cannot finish 4000 tokens).
    deadline = time.monotonic() + 120
    while True:
        job = jobs_named(http, f"http:{agent}")[0]
        if job.state == common_pb2.PROC_ZOMBIE:
            break
        assert time.monotonic() < deadline, "the job outlived its client"
        time.sleep(0.2)
    assert job.exit_reason == common_pb2.EXIT_KILLED
    assert job.generated_tokens < 4000


def test_metrics_parse_and_show_state(http: HTTP) -> None:
    """Scrape-time gauges follow the kernel's state: a running job, its KV blocks, services."""
    pid = http.system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt=PROMPT, sampling=common_pb2.SamplingParams(
            temperature=0, max_tokens=4000, ignore_eos=True))).pid
    try:
        families = http.scrape()
        running = {s.labels["model_name"]: s.value
                   for s in families["llmasos:num_requests_running"]}
        waiting = {s.labels["model_name"]: s.value
                   for s in families["llmasos:num_requests_waiting"]}
        assert running[MODEL] + waiting[MODEL] >= 1
        blocks = {(s.labels["model_name"], s.labels["kind"]): s.value
                  for s in families["llmasos:kv_blocks"]}
        assert blocks[(MODEL, "free")] > 0
        healthy = {s.labels["service"] for s in families["llmasos:service_state"]
                   if s.labels["state"] == "HEALTHY" and s.value == 1}
        assert healthy == {"security", "ipc", "scheduler", "inference"}
        for name in ("llmasos:time_to_first_token_seconds", "llmasos:kv_cache_usage_perc",
                     "llmasos:generation_tokens", "llmasos:service_restarts"):
            assert name in families, sorted(families)
    finally:
        http.system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=common_pb2.SIGKILL))
        http.system.call("Wait", kernel_pb2.WaitRequest(pid=pid))
    gone = http.scrape()
    running = {s.labels["model_name"]: s.value for s in gone["llmasos:num_requests_running"]}
    assert running[MODEL] == 0


def test_metrics_syscall_needs_a_token(http: HTTP) -> None:
    text = http.system.call("Metrics", kernel_pb2.MetricsRequest()).text
    assert "llmasos:kv_cache_usage_perc" in text
    r = httpx.get(f"{http.base}/metrics", timeout=30,
                  headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401


def sample(families: dict, name: str) -> float:
    return sum(s.value for s in families.get(name, []) if s.labels.get("model_name") == MODEL
               and not s.name.endswith("_created"))


def test_token_counters_move_when_jobs_run(http: HTTP) -> None:
    before = http.scrape()
    http.client().completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=5)
    after = http.scrape()
    assert sample(after, "llmasos:generation_tokens") - \
        sample(before, "llmasos:generation_tokens") >= 5
    assert sample(after, "llmasos:prompt_tokens") > sample(before, "llmasos:prompt_tokens")
    assert sample(after, "llmasos:request_success") > sample(before, "llmasos:request_success")


def test_a_job_that_cannot_fit_the_kv_pool_is_429(http: HTTP) -> None:
    """The pool (--kv-budget-mb 256) cannot hold a full 8192-token context: RESOURCE_EXHAUSTED."""
    with pytest.raises(openai.RateLimitError) as err:
        http.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=65536)
    assert err.value.status_code == 429
    assert "kv-budget-mb" in err.value.message


def test_a_list_of_prompts_gives_a_choice_each_in_order(http: HTTP) -> None:
    second = "Water boils at a temperature of"
    reply = http.client().completions.create(model=MODEL, prompt=[PROMPT, second],
                                             temperature=0, max_tokens=6)
    with http.llm() as llm:
        expected = [llm.generate_text(p, max_tokens=6, temperature=0) for p in (PROMPT, second)]
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == expected


def test_disconnect_kills_a_job_that_was_not_streamed(http: HTTP) -> None:
    """The connection closes only once the job runs: a client gone before its request is read
    gets no job at all (on a loaded machine a timeout-based close could come that early)."""
    agent = "disconnect-whole/1.0"
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4000,
                       "ignore_eos": True}).encode()
    host, port = http.base.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {http.system.root_token}\r\nUser-Agent: {agent}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 120
        while not (jobs := jobs_named(http, f"http:{agent}")) or not jobs[0].generated_tokens:
            assert time.monotonic() < deadline, f"the job never ran: {jobs}"
            time.sleep(0.2)
        assert jobs[0].state != common_pb2.PROC_ZOMBIE
    deadline = time.monotonic() + 120   # the socket is closed: the gateway must kill the job
    while (job := jobs_named(http, f"http:{agent}")[0]).state != common_pb2.PROC_ZOMBIE:
        assert time.monotonic() < deadline, f"the job outlived its client: {job}"
        time.sleep(0.2)
    assert job.exit_reason == common_pb2.EXIT_KILLED
    assert job.generated_tokens < 4000


def test_streamed_logprobs_and_max_completion_tokens(http: HTTP) -> None:
    chunks = list(http.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=5, logprobs=True,
        top_logprobs=2, stream=True, stream_options={"include_usage": True}))
    entries = [t for c in chunks if c.choices and c.choices[0].logprobs
               for t in c.choices[0].logprobs.content]
    assert chunks[-1].usage.completion_tokens == len(entries) <= 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(t.token for t in entries) == text


def syscalls_logged(http: HTTP, call: str) -> int:
    lines = http.system.log_text().splitlines()
    return sum(1 for line in lines if f'"call": "{call}"' in line and '"syscall"' in line)


def test_concurrent_streams_of_a_caller_share_one_poll_and_get_their_own_text(
        http: HTTP) -> None:
    """The gateway follows a caller's jobs on one Poll stream (not a Read each); every
    request still gets its own job's text, and another caller's jobs go on their own stream."""
    import threading
    other = http.system.adduser("httppoll")
    prompts = [PROMPT, "Once upon a time", "The three primary colors are", "def add(a, b):"]
    keys = [None, None, None, other]
    with http.llm() as llm:
        expected = [llm.generate_text(p, max_tokens=24, temperature=0) for p in prompts]
    polls, reads = syscalls_logged(http, "Poll"), syscalls_logged(http, "Read")
    start = threading.Barrier(len(prompts))
    got: dict[int, str] = {}

    def stream(i: int) -> None:
        start.wait(30)
        chunks = http.client(keys[i]).completions.create(
            model=MODEL, prompt=prompts[i], temperature=0, max_tokens=24, stream=True)
        got[i] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [got.get(i) for i in range(len(prompts))] == expected
    deadline = time.monotonic() + 60   # a Poll is logged when it ends, after its last job
    while (new_polls := syscalls_logged(http, "Poll") - polls) < 2:
        assert time.monotonic() < deadline, "the two callers' Poll streams never ended"
        time.sleep(0.1)
    assert syscalls_logged(http, "Read") == reads, "the gateway opened Read streams"
    assert 2 <= new_polls < len(prompts), new_polls   # one caller's three shared a stream
