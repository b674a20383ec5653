"""Splitting a shell line into commands: words as sh quotes them, `;` between commands,
a trailing `&` for the background, `#` comments."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass
class Command:
    argv: list[str]
    background: bool = False

    @property
    def text(self) -> str:
        """The command as it could be typed again (shown by `jobs`)."""
        return shlex.join(self.argv) + (" &" if self.background else "")


def parse(line: str) -> list[Command]:
    """'run "a b" & ; ps' -> [Command(['run', 'a b'], True), Command(['ps'])].
    ValueError on an unterminated quote or a stray `&`."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&")
    lex.whitespace_split = True
    commands, words = [], []
    for tok in lex:
        if tok in (";", "&", "&&", ";;", "&;"):
            if not words:
                if tok == ";":
                    continue
                raise ValueError(f"syntax error near {tok!r}")
            if tok not in (";", "&", "&;"):
                raise ValueError(f"{tok!r} is not supported; separate commands with ';'")
            commands.append(Command(words, background=tok.startswith("&")))
            words = []
        else:
            words.append(tok)
    if words:
        commands.append(Command(words))
    return commands
