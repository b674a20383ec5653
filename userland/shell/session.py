"""The shell's state and how one line runs: parse, dispatch to a command, turn errors into
exit statuses (0 ok, 1 failed, 2 usage, 127 unknown command, 130 Ctrl-C)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn, TextIO

from llmasos.client import LLMClient
from llmasos.errors import LLMError
from llmasos.fmt import paint
from llmasos.shell.jobs import Jobs
from llmasos.shell.parse import Command, parse

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 127, 130


class Usage(Exception):
    """A command was called wrongly; the message says how to call it."""


class HelpShown(Exception):
    """`cmd -h` printed its help; the command is done."""


class ShellExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ArgParser(argparse.ArgumentParser):
    """argparse that reports to the shell instead of exiting the process."""

    def error(self, message: str) -> NoReturn:
        raise Usage(f"{message}\nusage: {self.format_usage().removeprefix('usage: ').strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise Usage(message.strip())
        raise HelpShown()


@dataclass
class Shell:
    client: LLMClient
    interactive: bool
    lines: Iterator[str] = field(default_factory=lambda: iter(()))  # chat turns, in scripts
    out: TextIO = sys.stdout
    jobs: Jobs = field(default_factory=Jobs)
    status: int = 0

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def warn(self, message: str) -> None:
        print(f"llmsh: {paint(message, 'red', sys.stderr)}", file=sys.stderr, flush=True)

    def read_line(self, prompt: str) -> str | None:
        """The next line of input for a command that reads (chat); None at end of input."""
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                self.say()
                return None
            except KeyboardInterrupt:  # Ctrl-C at a reading prompt abandons the line only
                self.say()
                return ""
        return next(self.lines, None)

    def execute(self, line: str, errexit: bool = False) -> int:
        """Run every command of a line; with errexit, stop at the first that fails."""
        try:
            commands = parse(line)
        except ValueError as err:
            self.warn(f"syntax error: {err}")
            self.status = EXIT_USAGE
            return self.status
        upstream = 0
        for cmd in commands:
            cmd.stdin_pid = upstream
            self.status = self.run(cmd)
            upstream = cmd.pid if cmd.piped and not self.status else 0
            if errexit and self.status:
                break
        return self.status

    def run(self, cmd: Command) -> int:
        from llmasos.shell.commands import ALIASES, COMMANDS  # the table imports this module

        entry = COMMANDS.get(ALIASES.get(cmd.argv[0], cmd.argv[0]))
        if entry is None:
            self.warn(f"{cmd.argv[0]}: command not found (type `help` for the commands)")
            return EXIT_NOT_FOUND
        if cmd.background and not entry.background:
            self.warn(f"{cmd.argv[0]}: cannot run in the background (only jobs: run, translate, "
                      "summarize, ask, code)")
            return EXIT_USAGE
        if (cmd.piped or cmd.stdin_pid) and not entry.background:
            self.warn(f"{cmd.argv[0]}: only jobs (run, translate, summarize, ask, code) can "
                      "be joined by '|'")
            return EXIT_USAGE
        return guarded(self, cmd.argv[0], lambda: self._redirected(
            cmd, lambda: entry.fn(self, cmd, entry.parser().parse_args(cmd.argv[1:]))))

    def _redirected(self, cmd: Command, body: Callable[[], int]) -> int:
        """`> file` / `>> file`: the command's output goes to the file."""
        if not cmd.stdout:
            return body()
        saved = self.out
        with open(cmd.stdout, "a" if cmd.append else "w", encoding="utf-8") as f:
            self.out = f
            try:
                return body()
            finally:
                self.out = saved


def guarded(sh: Shell, name: str, body: Callable[[], int]) -> int:
    """A command's errors as messages on stderr and exit statuses, never a crashed shell."""
    try:
        return body()
    except ShellExit:
        raise
    except HelpShown:
        return EXIT_OK
    except Usage as err:
        sh.warn(f"{name}: {err}")
        return EXIT_USAGE
    except LLMError as err:
        sh.warn(f"{name}: {err}")
        return err.exit_status
    except OSError as err:
        sh.warn(f"{name}: {err.strerror or err}")
        return EXIT_FAIL
    except Exception as err:  # noqa: BLE001 - a bug in one command must not end the session
        sh.warn(f"{name}: internal error ({type(err).__name__}: {err}); please report it")
        return EXIT_FAIL
