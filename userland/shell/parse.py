"""Splitting a shell line into commands: words as sh quotes them, `;` between commands,
a trailing `&` for the background, `|` joining jobs into a pipeline (each stage reads the one
before it: kernel pipes), `< file`, `> file`, `>> file` redirections, `#` comments."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass
class Command:
    argv: list[str]
    background: bool = False
    stdin: str | None = None          # `< file`: the file's text is the job's {input}
    stdout: str | None = None         # `> file` / `>> file`: output goes there
    append: bool = False
    piped: bool = False               # a `|` follows: its output feeds the next stage
    stdin_pid: int = 0                # set when it runs: the stage before it in a pipeline
    pid: int = 0                      # set when a piped stage has been spawned

    @property
    def text(self) -> str:
        """The command as it could be typed again (shown by `jobs`)."""
        return shlex.join(self.argv) + (" &" if self.background else "")


def parse(line: str) -> list[Command]:
    """'run "a b" & ; ps' -> [Command(['run', 'a b'], True), Command(['ps'])];
    'run a | run b > out' -> two Commands, the first piped. ValueError on an unterminated
    quote, a stray `&` or `|`, or a redirection without a file."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    commands: list[Command] = []
    cmd = Command([])
    tokens = list(lex)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("<", ">", ">>"):
            if i + 1 >= len(tokens) or tokens[i + 1] in SEPARATORS:
                raise ValueError(f"{tok} needs a file name")
            if tok == "<":
                cmd.stdin = tokens[i + 1]
            else:
                cmd.stdout, cmd.append = tokens[i + 1], tok == ">>"
            i += 2
            continue
        if tok in SEPARATORS:
            if not cmd.argv:
                if tok == ";":
                    i += 1
                    continue
                raise ValueError(f"syntax error near {tok!r}")
            if tok not in (";", "&", "&;", "|"):
                raise ValueError(f"{tok!r} is not supported; separate commands with ';'")
            cmd.background, cmd.piped = tok.startswith("&"), tok == "|"
            commands.append(cmd)
            cmd = Command([])
        else:
            cmd.argv.append(tok)
        i += 1
    if cmd.argv:
        commands.append(cmd)
    elif commands and commands[-1].piped:
        raise ValueError("a pipe needs a command after '|'")
    return commands


SEPARATORS = (";", "&", "&&", ";;", "&;", "|", "||", "|&")
