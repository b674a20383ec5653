"""Pipes between jobs (Unix's `a | b`, for LLM jobs): a reader's prompt is a template around its
writer's output text, and the reader prefills that text as the writer produces it, so when the
writer ends most of the reader's prompt is already computed.

The text is tokenized by the reader's model (a Tokenize RPC, never under the table lock) as
template(text so far). Tokens are final only once the text is: each feed adds the tokens that
two successive tokenizations agree on (less a margin at the moving edge); at end of input the
whole prompt is tokenized once more, exactly as if the text had been given by hand, and any
token that came out differently is rewound and recomputed. So a pipeline's output is the same
as running its stages one after another.

Unix rules: a writer that ends (or is killed) gives its readers end of input (its exit reason is
the reader's stdin_exit); a reader that ends while its writer runs sends the writer SIGPIPE
unless the writer was spawned with ignore_sigpipe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc
import structlog

from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.kernel.replicas import lane_of
from llmasos.proto import common_pb2, inference_pb2
from llmasos.syscalls import SyscallError
from llmasos.syscalls.limits import PIPE_INPUT, SIGPIPE

log = structlog.get_logger()
FEED_EVERY = 8   # writer tokens between feeds (each feed tokenizes the reader's whole prompt)
MARGIN = 1       # tokens at the moving edge that the next text may still change


@dataclass
class Template:
    """Where the piped text goes: a prompt, or the last of some chat messages."""

    model: str
    prompt: str = ""
    messages: list[tuple[str, str]] = field(default_factory=list)

    def request(self, text: str) -> inference_pb2.TokenizeRequest:
        if not self.messages:
            return inference_pb2.TokenizeRequest(model=self.model, text=fill(self.prompt, text))
        msgs = [common_pb2.ChatMessage(role=r, content=c) for r, c in self.messages]
        msgs[-1].content = fill(msgs[-1].content, text)
        return inference_pb2.TokenizeRequest(
            model=self.model, messages=common_pb2.ChatMessages(messages=msgs))


def fill(template: str, text: str) -> str:
    return template.replace(PIPE_INPUT, text, 1) if PIPE_INPUT in template else template + text


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Reader:
    proc: Proc
    writer: Proc
    template: Template
    last_ids: list[int] = field(default_factory=list)   # the previous tokenization
    fed_tokens: int = -1                                 # writer tokens at the last feed


class Pipes:
    """The pipe table and the thread that feeds readers; state changes under table.lock."""

    def __init__(self, k: object) -> None:
        self.k = k
        self.table = k.table
        self.readers: dict[int, Reader] = {}     # reader pid → Reader   [table.lock]
        self.dirty = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="pipes", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.dirty.set()
        self.thread.join(timeout=10)

    # --- under table.lock --------------------------------------------------------------------

    def connect(self, reader: Proc, writer: Proc, template: Template) -> None:
        reader.stdin_pid, reader.input_open = writer.pid, True
        writer.stdout_pids.append(reader.pid)
        self.readers[reader.pid] = Reader(reader, writer, template)
        self.dirty.set()

    def wrote(self, writer: Proc) -> None:
        """The writer committed tokens: feed its readers every FEED_EVERY tokens."""
        if any(len(writer.output_ids) - r.fed_tokens >= FEED_EVERY
               for r in self._readers_of(writer)):
            self.dirty.set()

    def on_exit(self, proc: Proc) -> None:
        """A job ended: its readers get end of input; a reader gone early sends SIGPIPE."""
        if proc.stdout_pids:
            self.dirty.set()
        reader = self.readers.pop(proc.pid, None)
        if reader is None:
            return
        writer = reader.writer
        if writer.state in (State.ZOMBIE, State.REAPED) or writer.ignore_sigpipe:
            return
        if any(r.writer is writer for r in self.readers.values()):
            return   # another reader still reads
        log.info("sigpipe", pid=writer.pid, reader=proc.pid)
        self.k.executor.signal(writer, SIGPIPE)

    def _readers_of(self, writer: Proc) -> list[Reader]:
        return [r for r in self.readers.values() if r.writer is writer]

    # --- the feeding thread --------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.dirty.wait(1.0)
            self.dirty.clear()
            with self.table.lock:
                work = [(r, r.writer.text, len(r.writer.output_ids),
                         r.writer.state in (State.ZOMBIE, State.REAPED))
                        for r in self.readers.values() if r.proc.input_open
                        and (r.fed_tokens < len(r.writer.output_ids)
                             or r.writer.state in (State.ZOMBIE, State.REAPED))]
            for reader, text, tokens, ended in work:
                self._feed(reader, text, tokens, ended)

    def _feed(self, reader: Reader, text: str, tokens: int, ended: bool) -> None:
        try:
            ids = list(self.k.inference().Tokenize(reader.template.request(text),
                                                   timeout=60).token_ids)
        except (grpc.RpcError, SyscallError) as e:   # inference restarting: try again
            log.warning("pipe_feed_failed", pid=reader.proc.pid, error=str(e))
            self.stopping.wait(0.5)
            self.dirty.set()
            return
        with self.table.lock:
            if reader.proc.state in (State.ZOMBIE, State.REAPED):
                return
            if ended:
                if not self._close(reader, ids):
                    self.dirty.set()   # its step is in flight: rewind once it lands
                    return
            else:
                self._grow(reader, ids)
            reader.fed_tokens = tokens
        self.k.executor.wake()

    def _grow(self, reader: Reader, ids: list[int]) -> None:
        """Add the tokens two tokenizations agree on (the text only grows at its end)."""
        stable = max(0, common_prefix(reader.last_ids, ids) - MARGIN)
        reader.last_ids = ids
        proc = reader.proc
        if stable > len(proc.prompt_ids) and ids[:len(proc.prompt_ids)] == proc.prompt_ids:
            proc.prompt_ids = ids[:stable]

    def _close(self, reader: Reader, ids: list[int]) -> bool:
        """End of input: the prompt is exactly the whole text's tokens; False to retry."""
        proc = reader.proc
        keep = common_prefix(proc.prompt_ids, ids)
        if keep < len(proc.prompt_ids):
            if proc.state == State.RUNNING:
                return False
            self._rewind(proc, keep)
        proc.prompt_ids = ids
        proc.input_open = False
        proc.stdin_exit = reader.writer.exit_reason
        if proc.context_length and len(ids) >= proc.context_length:
            self.k.executor.end(proc, Exit.ERROR, -1,
                                f"its piped prompt is {len(ids)} tokens; the model holds at "
                                f"most {proc.context_length - 1}")
        log.info("pipe_input_closed", pid=proc.pid, writer=reader.writer.pid,
                 prompt_tokens=len(ids), rewound=len(proc.prompt_ids) - keep)
        return True

    def _rewind(self, proc: Proc, keep: int) -> None:
        pager = self.k.pagers.get(lane_of(proc))
        if pager is None or proc.pid not in pager:
            return
        if pager.is_swapped(proc.pid):
            self.k.executor.jobs.lost(proc)
        else:
            pager.rewind(proc.pid, keep)
            proc.kv_blocks = len(pager.block_table(proc.pid))
