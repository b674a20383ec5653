"""llmsh's commands: one function each, and the table that names them (help reads it)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos import fmt, tasks
from llmasos.errors import LLMError
from llmasos.mailbox import mode_text, parse_mode
from llmasos.names import exit_code, state_name
from llmasos.shell.parse import Command
from llmasos.shell.progress import ProgressBar
from llmasos.shell.session import (
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ArgParser,
    HelpShown,
    Shell,
    ShellExit,
    Usage,
)
from llmasos.tools import kill as kill_tool
from llmasos.tools import ps as ps_tool
from llmasos.tools import top as top_tool

# -- parsers ----------------------------------------------------------------------------------


def _parser(name: str, description: str) -> ArgParser:
    return ArgParser(prog=name, description=description, add_help=True)


def _generation(name: str, description: str) -> ArgParser:
    """A parser with the sampling options every generating command takes."""
    ap = _parser(name, description)
    ap.add_argument("-m", "--model", help="deployed model (see `models`)")
    ap.add_argument("-n", "--max-tokens", type=int, help="most tokens to generate")
    ap.add_argument("-t", "--temperature", type=float, help="0 is greedy")
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--seed", type=int, help="same seed, same output")
    ap.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    ap.add_argument("--nice", type=int, default=0, help="priority, -20 (high) .. 19 (low)")
    ap.add_argument("--ignore-eos", action="store_true", help="run to --max-tokens")
    ap.add_argument("--shm", default="", help="attach this named KV segment (its text comes "
                    "before the prompt; see `shm`)")
    return ap


def _spawn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": args.stop,
            "priority": args.nice, "ignore_eos": args.ignore_eos or None}


def _words(args: list[str], what: str) -> str:
    text = " ".join(args).strip()
    if not text:
        raise Usage(f"give the {what}")
    return text


# -- generating ----------------------------------------------------------------------------


def generate(sh: Shell, cmd: Command, args: argparse.Namespace, prompt: str | None = None,
             messages: list[dict[str, str]] | None = None) -> int:
    """Spawn a job; stream it in the foreground, or leave it running with `&`. In a pipeline
    it reads the stage before it (kernel pipes); `< file` makes the file its {input}."""
    if cmd.stdin is not None:
        text = Path(cmd.stdin).read_text(encoding="utf-8")
        prompt, messages = _with_input(prompt, text), messages and [
            *messages[:-1], {**messages[-1], "content": _with_input(messages[-1]["content"],
                                                                     text)}]
    proc = sh.client.spawn(prompt, messages=messages, name=cmd.argv[0],
                           stdin_pid=cmd.stdin_pid, shm=getattr(args, "shm", "") or "",
                           **_spawn_kwargs(args))
    if cmd.piped:   # the next stage reads it; only the last stage is shown
        cmd.pid = proc.pid
        return EXIT_OK
    if cmd.background:
        job = sh.jobs.add(proc.pid, cmd.text)
        sh.say(f"[{job.number}] {proc.pid}")
        return EXIT_OK
    return foreground(sh, proc.pid)


def _with_input(template: str | None, text: str) -> str | None:
    if template is None:
        return None
    return template.replace("{input}", text, 1) if "{input}" in template else \
        f"{template}\n{text}"


def foreground(sh: Shell, pid: int) -> int:
    """Stream a job's output to the terminal, then reap it. Ctrl-C kills the job (130)."""
    last = "\n"
    try:
        with sh.client.killing_on_interrupt(pid):
            for chunk in sh.client.read(pid):
                if chunk.text:
                    sh.say(chunk.text, end="")
                    last = chunk.text
            result = sh.client.wait(pid)
    except KeyboardInterrupt:
        return _interrupted(sh, pid)
    finally:
        if not last.endswith("\n"):
            sh.say()
    sh.jobs.remove(pid)
    return _verdict(sh, result)


def _interrupted(sh: Shell, pid: int) -> int:
    sh.jobs.remove(pid)
    sh.warn(f"job {pid} killed (Ctrl-C)")
    return EXIT_INTERRUPTED


def _verdict(sh: Shell, result: Any) -> int:
    if result.ok:
        return EXIT_OK
    sh.warn(f"job {result.pid} {result.reason}: {result.info.exit_message or 'no message'}")
    return exit_code(result.status) or 1


def cmd_run(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    return generate(sh, cmd, args, prompt=_words(args.prompt, "prompt"))


def cmd_translate(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    return generate(sh, cmd, args, messages=tasks.messages(
        "translate", text=_words(args.text, "text"), target_language=args.to))


def cmd_summarize(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    text = Path(args.file).read_text() if args.file else _words(args.text, "text or -f FILE")
    return generate(sh, cmd, args, messages=tasks.messages("summarize", text=text))


def cmd_ask(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    question = _words(args.question, "question")
    if args.context:
        msgs = tasks.messages("answer_in_context", question=question, context=args.context)
    else:
        msgs = tasks.messages("answer", question=question)
    return generate(sh, cmd, args, messages=msgs)


def cmd_code(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    return generate(sh, cmd, args, messages=tasks.messages(
        "generate_code", description=_words(args.description, "description"),
        language=args.language))


def cmd_chat(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    """Multi-turn chat until /bye (or end of input). Ctrl-C drops the current reply only."""
    history = [{"role": "system", "content": args.system}] if args.system else []
    if sh.interactive:
        sh.say("chatting; /bye to leave, Ctrl-C stops a reply")
    while (line := sh.read_line(fmt.prompt(">>> ", "cyan") if sh.interactive else "")) is not None:
        if line.strip() in ("/bye", "/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        proc = sh.client.spawn(messages=history, name="chat", **_spawn_kwargs(args))
        try:
            reply = "".join(_echo(sh, proc.pid))
        except KeyboardInterrupt:
            sh.say("^C")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
    return EXIT_OK


def _echo(sh: Shell, pid: int) -> list[str]:
    """Stream a job's reply, reap it, and return its pieces (JobFailed when it failed)."""
    pieces: list[str] = []
    with sh.client.killing_on_interrupt(pid):
        for chunk in sh.client.read(pid):
            if chunk.text:
                sh.say(chunk.text, end="")
                pieces.append(chunk.text)
        if not "".join(pieces).endswith("\n"):
            sh.say()
        sh.client.wait(pid).check()
    return pieces


# -- jobs -------------------------------------------------------------------------------------


def _pids(sh: Shell, specs: list[str]) -> list[int]:
    try:
        return [sh.jobs.resolve(s) for s in specs]
    except ValueError as err:
        raise Usage(str(err)) from None


def cmd_jobs(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    for job in sh.jobs.table.values():
        try:
            state = state_name(sh.client.stat(job.pid).state)
        except LLMError:  # gone from the table (reaped elsewhere)
            state = "GONE"
        label = "Done" if state in ("ZOMBIE", "GONE") else state.capitalize()
        sh.say(f"[{job.number}]  {label:<8} {job.pid:>6}  {job.text}")
    return EXIT_OK


def cmd_fg(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if not args.job and not sh.jobs.table:
        raise Usage("no current job")
    pid = _pids(sh, [args.job or "%+"])[0]
    job = sh.jobs.by_pid(pid)
    if job:
        sh.say(job.text.removesuffix(" &"))
    return foreground(sh, pid)


def cmd_wait(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    """Wait for the given jobs (default: every background job), print their text."""
    pids = _pids(sh, args.jobs) if args.jobs else [j.pid for j in sh.jobs.table.values()]
    status = EXIT_OK
    for pid in pids:
        try:
            with sh.client.killing_on_interrupt(pid):
                result = sh.client.wait(pid)
        except KeyboardInterrupt:
            return _interrupted(sh, pid)
        sh.jobs.remove(pid)
        if result.text:
            sh.say(result.text, end="" if result.text.endswith("\n") else "\n")
        status = _verdict(sh, result)
    return status


def cmd_kill(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    try:
        sig, pids, _ = kill_tool.parse(_resolve_jobs(sh, args.args))
    except kill_tool.Usage as err:
        raise Usage(f"{err or 'usage'}\nusage: kill [-s SIG | -SIG] PID|%JOB...") from None
    status = EXIT_OK
    for pid in pids:
        try:
            state = state_name(sh.client.kill(pid, sig))
        except LLMError as err:  # reported per pid, and on to the next, as kill(1) does
            sh.warn(f"kill: ({pid}) - {err}")
            status = 1
            continue
        if sh.interactive:
            sh.say(f"{pid}: {state}")
    return status


def _resolve_jobs(sh: Shell, words: list[str]) -> list[str]:
    try:
        return [str(sh.jobs.resolve(w)) if w.startswith("%") else w for w in words]
    except ValueError as err:
        raise Usage(str(err)) from None


def cmd_nice(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    for pid in _pids(sh, args.pids):
        now = sh.client.nice(pid, args.value)
        if sh.interactive:
            sh.say(f"{pid}: nice {now}")
    return EXIT_OK


# -- the system -------------------------------------------------------------------------------


def cmd_ps(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    try:
        names = ps_tool.fields(args.format)
    except ValueError as err:
        raise Usage(str(err)) from None
    procs = sh.client.ps(args.all, args.user)
    if args.json:
        sh.say(json.dumps([fmt.as_dict(p) for p in procs], indent=1))
    else:
        sh.say(ps_tool.render(procs, names))
    return EXIT_OK


def cmd_top(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if args.delay <= 0 or args.iterations < 0:
        raise Usage("-d must be > 0 and -n >= 0")
    return top_tool.run(sh.client, args.delay, args.iterations)


def cmd_services(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    sh.say(ps_tool.render_services(sh.client.services(), sh.client.nodes()))
    return EXIT_OK


def cmd_nodes(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    nodes = sh.client.nodes()
    if args.json:
        sh.say(json.dumps([fmt.as_dict(n) for n in nodes], indent=1))
    else:
        sh.say(ps_tool.render_nodes(nodes) if nodes else
               "no node has joined; on another machine: llmosd node --join HOST:PORT --token T "
               "(a token from `llmosd node token` here)")
    return EXIT_OK


def cmd_models(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if args.formats:
        reply = sh.client.formats()
        rows = [[reply.device, q, "default" if q == reply.default_quant else ""]
                for q in reply.quant_formats]
        sh.say(fmt.table(["DEVICE", "QUANT", ""], rows, []))
        return EXIT_OK
    models = sh.client.models()
    if args.json:
        sh.say(json.dumps([fmt.as_dict(m) for m in models], indent=1))
        return EXIT_OK
    rows = [[m.name, m.architecture, fmt.count(m.parameters), m.dtype, m.quant or "none",
             m.device, max(1, m.replicas), fmt.size(m.memory_bytes), m.context_length,
             m.source] for m in models]
    sh.say(fmt.table(["NAME", "ARCH", "PARAMS", "DTYPE", "QUANT", "DEVICE", "REPLICAS",
                      "WEIGHTS", "CONTEXT", "SOURCE"], rows,
                     ["PARAMS", "REPLICAS", "WEIGHTS", "CONTEXT"]))
    for name, target in sorted(sh.client.aliases().items()):
        sh.say(f"{name} -> {target} (alias)")
    return EXIT_OK


def cmd_deploy(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if args.remote:
        return deploy_remote(sh, args)
    if args.path is None or args.name is None:
        raise Usage("deploy PATH NAME, or deploy --remote URL [--api-key-env VAR] NAME")
    if not Path(args.path).exists():
        raise Usage(f"{args.path}: no such file or folder")
    bar = ProgressBar()   # on stderr: stdout keeps the result alone
    try:
        m = sh.client.deploy(args.path, args.name, args.dtype, quant=args.quant, tp=args.tp,
                             pp=args.pp, progress=bar, replicas=args.replicas,
                             nodes=[n for n in args.nodes.split(",") if n],
                             pp_steps=args.pp_steps)
    finally:
        bar.close()
    ranks = (f" on {m.tp} tensor-parallel ranks" if m.tp > 1 else "") + (
        f" in {m.pp} pipeline stages" if m.pp > 1 else "") + (
        f" as {m.replicas} replicas" if m.replicas > 1 else "")
    sh.say(f"deployed {m.name}: {m.architecture}, {fmt.count(m.parameters)} parameters, "
           f"{m.dtype} on {m.device}{ranks}, quant {m.quant or 'none'}, "
           f"{fmt.size(m.memory_bytes)} of weights")
    return EXIT_OK


def cmd_compress(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    """Offline, on the files: the daemon is not asked (drivers/prune)."""
    from llmasos.drivers.prune import cli as prune_cli  # torch only once it runs

    try:
        prune_cli.run(args, sh.say)
    except ValueError as err:   # a bad request; a missing file is an OSError: status 1
        raise Usage(str(err)) from None
    except ModuleNotFoundError as err:
        sh.warn(f"compress: {err}")
        return EXIT_FAIL
    return EXIT_OK


def deploy_remote(sh: Shell, args: argparse.Namespace) -> int:
    """deploy --remote URL [--api-key-env VAR | --api-key-file FILE] [--remote-model M] NAME"""
    name = args.name or args.path
    if name is None or (args.name and args.path):
        raise Usage("deploy --remote URL [--api-key-env VAR] NAME: one NAME, no PATH")
    m = sh.client.deploy("", name, remote_url=args.remote, api_key_env=args.api_key_env,
                         api_key_file=args.api_key_file, remote_model=args.remote_model)
    sh.say(f"deployed {m.name}: hosted at {m.source}")
    return EXIT_OK


def cmd_alias(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if args.name is None:  # list them
        for name, target in sorted(sh.client.aliases().items()):
            sh.say(f"{name} -> {target}")
        return EXIT_OK
    if args.delete:
        sh.client.alias(args.name, "")
    elif args.target is None:
        raise Usage("alias NAME TARGET, alias -d NAME, or alias to list them")
    else:
        sh.client.alias(args.name, args.target)
    if sh.interactive:
        sh.say(f"removed alias {args.name}" if args.delete else f"{args.name} -> {args.target}")
    return EXIT_OK


def cmd_undeploy(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    sh.client.undeploy(args.name)
    if sh.interactive:
        sh.say(f"undeployed {args.name}")
    return EXIT_OK


def cmd_whoami(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    me = sh.client.whoami()
    if args.verbose:
        q = me.quota
        limits = "none" if me.root else (f"jobs={q.max_jobs or '-'} tokens={q.max_tokens or '-'} "
                                         f"kv_share={q.kv_share or '-'}")
        sh.say(f"{me.user} uid={me.uid}{' root' if me.root else ''} "
               f"capabilities={','.join(me.capabilities)} quota={limits}")
    else:
        sh.say(me.user)
    return EXIT_OK


def cmd_audit(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if args.n <= 0:
        raise Usage("N must be > 0")
    entries = sh.client.audit(args.n, user=args.user, call=args.call)
    rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time_unix)), e.user or "-",
             e.call, e.code, e.args_json, e.message[:60]] for e in entries]
    sh.say(fmt.table(["TIME", "USER", "CALL", "CODE", "ARGS", "MESSAGE"], rows, []))
    return EXIT_OK


# -- mailboxes (IPC) --------------------------------------------------------------------------


def cmd_mkmbox(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    try:
        parse_mode(args.mode)
    except ValueError as err:
        raise Usage(str(err)) from None
    sh.client.mailbox(args.name).create(args.mode, max_messages=args.size,
                                        max_bytes=args.bytes)
    if sh.interactive:
        sh.say(f"created mailbox {args.name} ({args.mode})")
    return EXIT_OK


def cmd_send(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    seq = sh.client.mailbox(args.name).send(_words(args.text, "text to send"))
    if sh.interactive:
        sh.say(f"{args.name}: message {seq}")
    return EXIT_OK


def cmd_recv(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    """Print the oldest message (waiting up to --timeout); exit 1 if none came."""
    if args.timeout < 0:
        raise Usage("--timeout must be >= 0")
    msg = sh.client.mailbox(args.name).receive(args.timeout)
    if args.verbose:
        sh.say(f"# {msg.sequence} from {msg.sender}" + (f" (pid {msg.pid})" if msg.pid else ""))
    sh.say(msg.text, end="" if msg.text.endswith("\n") else "\n")
    return EXIT_OK


def cmd_ipcs(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    boxes, segs = sh.client.mailbox().list(), sh.client.shm_list()
    if args.json:
        sh.say(json.dumps({"mailboxes": [fmt.as_dict(b) for b in boxes],
                           "segments": [fmt.as_dict(s) for s in segs]}, indent=1))
        return EXIT_OK
    rows = [[b.name, b.owner, mode_text(b), b.messages, fmt.size(b.bytes), b.max_messages,
             fmt.size(b.max_bytes)] for b in boxes]
    sh.say(fmt.table(["MAILBOX", "OWNER", "MODE", "MESSAGES", "BYTES", "MAX", "MAXBYTES"],
                     rows, ["MESSAGES", "BYTES", "MAX", "MAXBYTES"]))
    if segs:
        rows = [[s.name, s.owner, mode_text(s), s.model, s.tokens, s.blocks,
                 ",".join(map(str, s.attached)) or "-", "removed" if s.removed else ""]
                for s in segs]
        sh.say(fmt.table(["SEGMENT", "OWNER", "MODE", "MODEL", "TOKENS", "BLOCKS", "ATTACHED",
                          ""], rows, ["TOKENS", "BLOCKS"]))
    return EXIT_OK


def cmd_shm(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    """shm NAME [--mode M] TEXT...: compute TEXT once as a named KV segment (-f FILE too)."""
    text = Path(args.file).read_text(encoding="utf-8") if args.file else \
        _words(args.text, "text or -f FILE")
    info = sh.client.shm_create(args.name, text, args.mode, model=args.model)
    sh.say(f"segment {info.name}: {info.tokens} tokens in {info.blocks} KV blocks on "
           f"{info.model}; attach with --shm {info.name}")
    return EXIT_OK


def cmd_ipcrm(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    status = EXIT_OK
    for name in args.names:
        try:
            if args.segment:
                sh.client.shm_remove(name)
                continue
            dropped = sh.client.mailbox(name).remove()
        except LLMError as err:  # reported per name, and on to the next, as ipcrm(1) does
            sh.warn(f"ipcrm: {name}: {err}")
            status = 1
            continue
        if sh.interactive:
            sh.say(f"removed {name} ({dropped} messages dropped)")
    return status


def cmd_help(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    if args.command:
        entry = COMMANDS.get(args.command)
        if entry is None:
            raise Usage(f"{args.command}: no such command")
        sh.say(entry.parser().format_help().rstrip())
        return EXIT_OK
    width = max(len(n) for n in COMMANDS)
    for name, entry in COMMANDS.items():
        sh.say(f"  {name:<{width}}  {entry.summary}")
    sh.say("\nEnd a job command with & to run it in the background; `help CMD` for options.")
    return EXIT_OK


def cmd_exit(sh: Shell, cmd: Command, args: argparse.Namespace) -> int:
    raise ShellExit(sh.status if args.status is None else args.status)


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    fn: Callable[[Shell, Command, argparse.Namespace], int]
    summary: str
    parser: Callable[[], ArgParser]
    background: bool = False  # may end with &


def _p_run() -> ArgParser:
    ap = _generation("run", "Generate text from a prompt, streaming it.")
    ap.add_argument("prompt", nargs=argparse.REMAINDER)
    return ap


def _p_translate() -> ArgParser:
    ap = _generation("translate", "Translate text.")
    ap.add_argument("-l", "--to", default="English", help="target language (default English)")
    ap.add_argument("text", nargs=argparse.REMAINDER)
    return ap


def _p_summarize() -> ArgParser:
    ap = _generation("summarize", "Summarize text (or a file's contents).")
    ap.add_argument("-f", "--file", help="read the text from this file")
    ap.add_argument("text", nargs=argparse.REMAINDER)
    return ap


def _p_ask() -> ArgParser:
    ap = _generation("ask", "Answer a question, optionally from a context.")
    ap.add_argument("-c", "--context", help="text the answer should come from")
    ap.add_argument("question", nargs=argparse.REMAINDER)
    return ap


def _p_code() -> ArgParser:
    ap = _generation("code", "Write code from a description.")
    ap.add_argument("-l", "--language", default="Python")
    ap.add_argument("description", nargs=argparse.REMAINDER)
    return ap


def _p_chat() -> ArgParser:
    ap = _generation("chat", "Multi-turn chat; /bye leaves.")
    ap.add_argument("-s", "--system", help="system prompt")
    return ap


def _p_simple(name: str, description: str, *args: tuple[tuple[str, ...], dict]) -> Callable[
        [], ArgParser]:
    def make() -> ArgParser:
        ap = _parser(name, description)
        for flags, kw in args:
            ap.add_argument(*flags, **kw)
        return ap
    return make


class RawParser(ArgParser):
    """kill's arguments look like options (-9, -STOP): hand them over unparsed."""

    def parse_args(self, args: list[str] | None = None,  # type: ignore[override]
                   namespace: object = None) -> argparse.Namespace:
        if args and args[0] in ("-h", "--help"):
            self.print_help()
            raise HelpShown()
        return argparse.Namespace(args=list(args or []))


def _p_compress() -> ArgParser:
    from llmasos.drivers.prune import cli as prune_cli  # no torch: arguments only

    ap = _parser("compress", "Write a pruned copy of a model as a folder `deploy` loads; "
                 "runs here, on the files, without the daemon.")
    prune_cli.add_arguments(ap)
    return ap


def _p_kill() -> ArgParser:
    return RawParser(prog="kill", usage="kill [-s SIG | -SIG] PID|%%JOB...",
                     description="Signal jobs: -STOP, -CONT, -TERM (the default) or -KILL.")


COMMANDS: dict[str, Entry] = {
    "run": Entry(cmd_run, "generate text from a prompt: run [-m MODEL] [-n N] PROMPT [&]",
                 _p_run, True),
    "chat": Entry(cmd_chat, "multi-turn chat (/bye to leave)", _p_chat),
    "translate": Entry(cmd_translate, "translate [-l LANG] TEXT", _p_translate, True),
    "summarize": Entry(cmd_summarize, "summarize TEXT | -f FILE", _p_summarize, True),
    "ask": Entry(cmd_ask, "ask [-c CONTEXT] QUESTION", _p_ask, True),
    "code": Entry(cmd_code, "code [-l LANGUAGE] DESCRIPTION", _p_code, True),
    "jobs": Entry(cmd_jobs, "list background jobs", _p_simple("jobs", "Background jobs.")),
    "fg": Entry(cmd_fg, "bring a job to the foreground: fg [%N|PID]", _p_simple(
        "fg", "Stream a background job's output and wait for it.",
        (("job",), {"nargs": "?"}))),
    "wait": Entry(cmd_wait, "wait for jobs and print their text: wait [PID|%N...]", _p_simple(
        "wait", "Wait for jobs (default: all background jobs).", (("jobs",), {"nargs": "*"}))),
    "kill": Entry(cmd_kill, "signal jobs: kill [-STOP|-CONT|-TERM|-KILL] PID...", _p_kill),
    "nice": Entry(cmd_nice, "change priority: nice VALUE PID...", _p_simple(
        "nice", "Set jobs' nice value (-20 highest .. 19 lowest; lowering needs root).",
        (("value",), {"type": int}), (("pids",), {"nargs": "+"}))),
    "ps": Entry(cmd_ps, "list jobs: ps [-a] [-u USER] [-o FIELDS] [--json]", _p_simple(
        "ps", "List jobs.", (("-a", "--all"), {"action": "store_true"}),
        (("-u", "--user"), {"default": ""}),
        (("-o", "--format"), {"default": ps_tool.DEFAULT_FIELDS}),
        (("--json",), {"action": "store_true"}))),
    "top": Entry(cmd_top, "live view of jobs (q quits): top [-d SECONDS]", _p_simple(
        "top", "Live view of jobs, tokens/s, KV usage and services.",
        (("-d", "--delay"), {"type": float, "default": 2.0}),
        (("-n", "--iterations"), {"type": int, "default": 0}))),
    "services": Entry(cmd_services, "the supervised services",
                      _p_simple("services", "The supervised services.")),
    "nodes": Entry(cmd_nodes, "the machines that joined: nodes [--json]", _p_simple(
        "nodes", "The nodes (llmosd node --join): state, last heartbeat, replicas, devices.",
        (("--json",), {"action": "store_true"}))),
    "models": Entry(cmd_models, "the deployed models", _p_simple(
        "models", "The deployed models (--formats: the quantizations each device serves).",
        (("--json",), {"action": "store_true"}), (("--formats",), {"action": "store_true"}))),
    "deploy": Entry(cmd_deploy, "load a model: deploy PATH NAME [--dtype D] [--quant Q] "
                    "[--tp N] [--pp M] [--replicas R] [--nodes HOST,..|anywhere]; "
                    "deploy --remote URL --api-key-env VAR NAME",
                    _p_simple(
        "deploy", "Load a model from a GGUF file or a Hugging Face folder, or name a hosted "
        "model at an OpenAI-compatible endpoint (root).",
        (("path",), {"nargs": "?"}), (("name",), {"nargs": "?"}),
        (("--dtype",), {"default": ""}),
        (("--quant",), {"default": "", "help": "none, int8 or a recipe (models --formats)"}),
        (("--tp",), {"type": int, "default": 0,
                     "help": "tensor-parallel ranks (must divide the head counts)"}),
        (("--pp",), {"type": int, "default": 0,
                     "help": "pipeline stages (must divide the layers)"}),
        (("--pp-steps",), {"type": int, "default": 0,
                           "help": "steps of a pp model in flight at once (2..pp)"}),
        (("--replicas",), {"type": int, "default": 0,
                           "help": "copies, each its own inference process and KV pool"}),
        (("--nodes",), {"default": "", "metavar": "HOST,..|anywhere",
                        "help": "where the replicas run: one host per replica (head = this "
                                "llmosd's), or anywhere"}),
        (("--remote",), {"default": "", "metavar": "URL",
                         "help": "an OpenAI-compatible endpoint, e.g. https://host/v1"}),
        (("--api-key-env",), {"default": "", "metavar": "VAR",
                              "help": "llmosd reads the key from this variable"}),
        (("--api-key-file",), {"default": "", "metavar": "FILE",
                               "help": "... or from this 0600 file"}),
        (("--remote-model",), {"default": "", "metavar": "M",
                               "help": "the endpoint's name for it (default NAME)"}))),
    "compress": Entry(cmd_compress, "prune a model into a new folder: compress SRC --out DIR "
                      "--method layers|mlp|heads|magnitude|wanda|2:4 [--ratio R]", _p_compress),
    "undeploy": Entry(cmd_undeploy, "unload a model: undeploy NAME", _p_simple(
        "undeploy", "Unload a model (root).", (("name",), {}))),
    "alias": Entry(cmd_alias, "name a model: alias NAME TARGET, alias -d NAME, alias", _p_simple(
        "alias", "Point a model name at a deployed model (root); no arguments: list them.",
        (("name",), {"nargs": "?"}), (("target",), {"nargs": "?"}),
        (("-d", "--delete"), {"action": "store_true"}))),
    "whoami": Entry(cmd_whoami, "who you are to llmosd (-v for details)", _p_simple(
        "whoami", "Your user name.", (("-v", "--verbose"), {"action": "store_true"}))),
    "audit": Entry(cmd_audit, "the audit log (root): audit [N] [-u USER] [-c CALL]", _p_simple(
        "audit", "The last N entries of the audit log (root).",
        (("n",), {"nargs": "?", "type": int, "default": 20}),
        (("-u", "--user"), {"default": ""}), (("-c", "--call"), {"default": ""}))),
    "mkmbox": Entry(cmd_mkmbox, "make a mailbox: mkmbox NAME [--mode owner|group:U,..|all] "
                    "[--size N]", _p_simple(
        "mkmbox", "Create a mailbox you own. Mode says who else may send and receive: owner "
        "(nobody), group:alice,bob (those users), all (everyone).", (("name",), {}),
        (("--mode",), {"default": "owner"}),
        (("--size",), {"type": int, "default": 0, "help": "most messages held (default 1024)"}),
        (("--bytes",), {"type": int, "default": 0, "help": "most bytes held (default 16M)"}))),
    "send": Entry(cmd_send, "send a message: send NAME TEXT", _p_simple(
        "send", "Append a message to a mailbox (fails when it is full).", (("name",), {}),
        (("text",), {"nargs": argparse.REMAINDER}))),
    "recv": Entry(cmd_recv, "take a message: recv NAME [--timeout S] [-v]", _p_simple(
        "recv", "Print the oldest message of a mailbox, waiting up to --timeout seconds.",
        (("name",), {}), (("--timeout",), {"type": float, "default": 0.0}),
        (("-v", "--verbose"), {"action": "store_true", "help": "say who sent it"}))),
    "ipcs": Entry(cmd_ipcs, "list the mailboxes and KV segments you may use", _p_simple(
        "ipcs", "Mailboxes (name, owner, mode, messages and bytes held, bounds) and KV "
        "segments (name, owner, mode, model, tokens, blocks, attached jobs).",
        (("--json",), {"action": "store_true"}))),
    "ipcrm": Entry(cmd_ipcrm, "remove mailboxes (or -s KV segments): ipcrm [-s] NAME...",
                   _p_simple(
        "ipcrm", "Remove mailboxes and their messages, or with -s KV segments (owner or root).",
        (("names",), {"nargs": "+"}),
        (("-s", "--segment"), {"action": "store_true", "help": "remove KV segments"}))),
    "shm": Entry(cmd_shm, "make a named KV segment: shm NAME [--mode M] TEXT... | -f FILE",
                 _p_simple(
        "shm", "Compute a prefix once and pin it; jobs attach it with --shm NAME and share its "
        "KV blocks. Mode: owner, group:alice,bob or all.", (("name",), {}),
        (("text",), {"nargs": argparse.REMAINDER}), (("--mode",), {"default": "owner"}),
        (("-f", "--file"), {"default": ""}), (("--model",), {"default": None}))),
    "help": Entry(cmd_help, "this list, or help CMD", _p_simple(
        "help", "Commands.", (("command",), {"nargs": "?"}))),
    "exit": Entry(cmd_exit, "leave the shell: exit [STATUS]", _p_simple(
        "exit", "Leave the shell.", (("status",), {"nargs": "?", "type": int}))),
}

ALIASES = {"quit": "exit", "?": "help"}  # what people type first
