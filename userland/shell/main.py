"""llmsh: the LLMasOS shell.

    llmsh                      interactive (line editing, history, tab completion)
    llmsh -c 'run -n 20 Hi'    run commands and exit
    llmsh FILE                 run a script
    ... | llmsh                commands from stdin
Scripts stop at the first failing command and exit with its status (--keep-going to go on).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

from llmasos import connect, fmt
from llmasos.client import LLMClient
from llmasos.proto import common_pb2
from llmasos.shell.commands import COMMANDS
from llmasos.shell.complete import Completer
from llmasos.shell.session import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Shell, ShellExit
from llmasos.version import version_string

HISTORY_FILE = "llmsh_history"
HISTORY_LENGTH = 2000


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmsh", description="The LLMasOS shell.")
    ap.add_argument("--version", action="version", version=version_string("llmsh"))
    ap.add_argument("-c", dest="command", metavar="COMMANDS", help="run these commands and exit")
    ap.add_argument("file", nargs="?", help="a script to run")
    ap.add_argument("-m", "--model", help="default model for jobs (default: the first deployed)")
    ap.add_argument("--addr", help="llmosd's address (default $LLMASOS_ADDR or 127.0.0.1:7070)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    ap.add_argument("-k", "--keep-going", action="store_true",
                    help="in scripts, go on after a failing command")
    return ap


def script_lines(args: argparse.Namespace) -> Iterator[str]:
    if args.command is not None:
        yield from args.command.splitlines()
    elif args.file and args.file != "-":
        with open(args.file) as f:
            yield from (line.rstrip("\n") for line in f)
    else:
        yield from (line.rstrip("\n") for line in sys.stdin)


def run_script(sh: Shell, keep_going: bool) -> int:
    """Each line in turn; the first failure ends the script unless keep_going."""
    worst = EXIT_OK
    for line in sh.lines:
        status = sh.execute(line, errexit=not keep_going)
        worst = status or worst
        if status and not keep_going:
            return status
    return worst if keep_going else sh.status


def prompt() -> str:
    return fmt.prompt("llmsh", "green") + "$ "


def setup_readline(sh: Shell) -> Callable[[], None]:
    """Line editing, history from $LLMASOS_HOME, completion; returns the history saver."""
    import readline

    history = connect.home() / HISTORY_FILE
    with contextlib.suppress(OSError):
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history)
    readline.set_history_length(HISTORY_LENGTH)
    completer = Completer(sh.client, list(COMMANDS))
    readline.set_completer(completer.complete)
    readline.set_completer_delims(" \t\n;&")
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        with contextlib.suppress(OSError):
            readline.write_history_file(history)
    return save


def notify_done(sh: Shell) -> None:
    """Before a prompt, say which background jobs have finished, as bash does."""
    for job in list(sh.jobs.table.values()):
        if job.notified:
            continue
        try:
            state = sh.client.stat(job.pid).state
        except Exception:  # noqa: BLE001 - unreachable kernel: say nothing now
            continue
        if state in (common_pb2.PROC_ZOMBIE, common_pb2.PROC_REAPED):
            job.notified = True
            sh.say(f"[{job.number}]+ Done    {job.text.removesuffix(' &')}")


def repl(sh: Shell) -> int:
    """Read, run, repeat until exit or Ctrl-D. Ctrl-C abandons the line or stops the job."""
    save_history = setup_readline(sh)
    try:
        while True:
            notify_done(sh)
            try:
                line = input(prompt())
            except EOFError:
                sh.say()
                return sh.status
            except KeyboardInterrupt:
                sh.say()
                sh.status = EXIT_INTERRUPTED
                continue
            try:
                sh.execute(line)
            except KeyboardInterrupt:  # between calls of a command that runs no job
                sh.say()
                sh.status = EXIT_INTERRUPTED
    finally:
        save_history()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is not None and args.file:
        print("llmsh: give either -c COMMANDS or FILE, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.file and args.file != "-" and not os.path.isfile(args.file):
        print(f"llmsh: {args.file}: no such file", file=sys.stderr)
        return EXIT_USAGE
    interactive = args.command is None and not args.file and sys.stdin.isatty()
    client = LLMClient(model_name=args.model, address=args.addr, timeout=args.timeout)
    sh = Shell(client, interactive)
    try:
        if interactive:
            # Ctrl-C is the user's, even when we inherited SIGINT ignored (nohup, a background job)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            return repl(sh)
        sh.lines = script_lines(args)
        return run_script(sh, args.keep_going)
    except ShellExit as done:
        return done.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
