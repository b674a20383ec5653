"""Chat templates: the model's own jinja2 template, rendered the way HF transformers renders it.

Templates come from model files, so they are untrusted code: they run in jinja2's immutable
sandbox with the same globals HF gives them (raise_exception, strftime_now, a non-escaping tojson).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,  # noqa: ANN401 - templates pass anything JSON can hold
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, HF's marker of assistant spans: renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks/lstrip_blocks as HF sets them: templates are written expecting them
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)

    def render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        **kwargs: Any,  # noqa: ANN401 - extra template variables, as HF allows
    ) -> str:
        # special tokens first so that explicit kwargs win, as in HF's apply_chat_template
        variables = {**self.special_tokens, **kwargs}
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
