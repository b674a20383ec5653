"""Jobs of hosted models: one thread per running job streams its completion from an
OpenAI-compatible endpoint (drivers/remote/client.py) into the process table, so a remote job
is a process like any other: a PID, `ps`, Read, Wait, quotas, the journal.

Signals: Kill and STOP set the job's `cancel` event (JobControl's on_signal hook); the thread
sees it at its next chunk, leaves the stream (the connection closes) and delivers the pending
signal at that chunk boundary, as the step loop does for local jobs. CONT starts a new thread
that asks again with the prompt plus the text so far. There is no KV and there are no token
ids: proc.output_ids stays empty, proc.text grows by each chunk's text.

The API key is read from the deployment's env var or 0600 file each time a stream starts; it
lives only in that thread's RemoteModel (whose repr masks it), never in the table, the journal
or a log line.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import structlog

from llmasos.drivers.remote.client import Completion, RemoteError, RemoteModel, load_api_key
from llmasos.kernel.journal import Tokens
from llmasos.kernel.kernel import Deployed, Kernel
from llmasos.kernel.proctable import Exit, Proc, State

log = structlog.get_logger()
ENDED = (State.ZOMBIE, State.REAPED)
FINISH = {"stop": Exit.STOP, "length": Exit.LENGTH}   # OpenAI's finish_reason -> exit reason


@dataclass
class Job:
    proc: Proc
    cancel: threading.Event
    chunks: int = 0          # chunks received since this kernel started it (max_tokens budget)


class RemoteJobs:
    """pid -> Job of the remote jobs that have a thread; guarded by k.table.lock."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.jobs: dict[int, Job] = {}
        self.chunks: dict[int, int] = {}   # pid -> chunks of a stopped job (its budget so far)

    def deployment(self, proc: Proc) -> Deployed | None:
        dep = self.k.models.get(proc.model)
        return dep if dep is not None and dep.remote_url else None

    # --- called under k.table.lock -------------------------------------------------------------

    def start(self, proc: Proc, chunks: int = 0) -> None:
        """Stream a READY job (a new one, a continued one, one recovered at boot) that has
        received `chunks` chunks so far."""
        if proc.pid in self.jobs:
            return
        job = Job(proc, threading.Event(), chunks)
        self.jobs[proc.pid] = job
        threading.Thread(target=self._run, args=(job,), name=f"remote-{proc.pid}",
                         daemon=True).start()

    def on_signal(self, proc: Proc, sig: int) -> None:
        """JobControl's hook, after a signal changed the job: cancel its stream or restart it."""
        if self.deployment(proc) is None:
            return
        job = self.jobs.get(proc.pid)
        if proc.state in ENDED:
            self.chunks.pop(proc.pid, None)
        if job is not None and (proc.pending_signal or proc.state in (State.STOPPED, *ENDED)):
            job.cancel.set()
        elif job is None and proc.state == State.READY:   # CONT
            self.start(proc, self._journaled_chunks(proc))

    def _journaled_chunks(self, proc: Proc) -> int:
        """Chunks received so far: counted when it stopped, or (after a reboot) journaled."""
        if proc.pid in self.chunks:
            return self.chunks.pop(proc.pid)
        return self.k.journal.token_rows(proc.pid) or 0

    def resume_all(self) -> None:
        """At boot: the journal brought remote jobs back READY with their text so far."""
        with self.k.table.lock:
            for proc in self.k.table.live():
                if proc.state == State.READY and self.deployment(proc) is not None:
                    self.start(proc, self._journaled_chunks(proc))

    # --- the job's thread ----------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        try:
            while (req := self._begin(job)) is not None:
                finish = self._stream(job, req)
                if not self._settle(job, finish):
                    return
        except RemoteError as e:
            self._fail(job, f"the endpoint failed ({e.code}): {e}")
        except OSError as e:   # the key file went away
            self._fail(job, f"cannot read the API key: {e.strerror}; redeploy with a "
                            "readable --api-key-file")
        except Exception as e:   # a bug: the job ends with it, the kernel goes on
            log.exception("remote_job_crashed", pid=job.proc.pid)
            self._fail(job, f"internal error streaming from the endpoint: {type(e).__name__}")

    def _begin(self, job: Job) -> tuple[RemoteModel, Completion] | None:
        """READY -> RUNNING, and what to ask for: the prompt plus the text so far."""
        proc = job.proc
        with self.k.table.lock:
            dep = self.deployment(proc)
            if proc.state != State.READY or dep is None:
                self._forget(job)
                return None
            self.k.table.set_state(proc, State.RUNNING)
            s = proc.sampling
            req = Completion(
                prompt=proc.prompt_text + proc.text,
                max_tokens=max(1, proc.max_tokens - job.chunks),
                temperature=s.temperature if s is not None and s.HasField("temperature")
                else 0.0,   # LLMasOS's default is greedy, not the endpoint's 1.0
                top_p=s.top_p if s is not None and s.HasField("top_p") else 1.0,
                stop=list(s.stop) if s is not None else [],
                seed=s.seed if s is not None and s.HasField("seed") else None)
        key = load_api_key(dep.api_key_env, dep.api_key_file)   # at request time, never kept
        return RemoteModel(dep.remote_url, dep.remote_model or proc.model, key), req

    def _stream(self, job: Job, req: tuple[RemoteModel, Completion]) -> str | None:
        """Append chunks until the endpoint finishes (its finish_reason) or the job is
        cancelled (None)."""
        model, completion = req
        proc, table = job.proc, self.k.table
        with contextlib.closing(model.stream(completion, job.cancel)) as chunks:
            for chunk in chunks:
                with table.lock:
                    if proc.state in ENDED:
                        return None
                    if chunk.text:
                        self._append(job, chunk.text)
                    if chunk.finish_reason or job.chunks >= proc.max_tokens:
                        return chunk.finish_reason or "length"
                    if proc.pending_signal:   # set without the hook too (llmosd shutting down)
                        return None
                if job.cancel.is_set():
                    return None
        with table.lock:
            cancelled = job.cancel.is_set() or bool(proc.pending_signal)
        return None if cancelled else "stop"   # ended without a finish_reason: done

    def _append(self, job: Job, text: str) -> None:
        proc = job.proc
        if not proc.first_token:
            proc.first_token = proc.started or proc.created
        proc.text += text
        job.chunks += 1
        self.k.journal.record_tokens([Tokens(proc.pid, len(proc.output_ids), [], [], text)])
        self.k.table.touch(proc)

    def _settle(self, job: Job, finish: str | None) -> bool:
        """After the stream: end the job, or deliver the signal that cancelled it; True when
        it goes on streaming (a CONT came before the STOP was acted on)."""
        proc = job.proc
        with self.k.table.lock:
            if proc.state in ENDED:
                self._forget(job)
                return False
            if finish is not None:
                self._forget(job)
                self.k.executor.end(proc, FINISH.get(finish, Exit.STOP))
                return False
            job.cancel.clear()
            self.k.table.set_state(proc, State.READY)
            if proc.pending_signal:
                self.k.executor.jobs.deliver(proc)   # KILL ends it, STOP stops it
            if proc.state != State.READY:
                self._forget(job)
                return False
            return True

    def _fail(self, job: Job, message: str) -> None:
        with self.k.table.lock:
            self._forget(job)
            if job.proc.state not in ENDED:
                self.k.executor.end(job.proc, Exit.ERROR, -1, message)

    def _forget(self, job: Job) -> None:
        if self.jobs.get(job.proc.pid) is job:
            del self.jobs[job.proc.pid]
            if job.proc.state == State.STOPPED:
                self.chunks[job.proc.pid] = job.chunks
