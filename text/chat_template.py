"""Render Hugging Face chat templates (Jinja2) in a sandbox, with the globals and filters HF templates expect."""
import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)


class _GenerationBlock(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by HF to mark assistant text for training masks).

    We only need the text, so the block renders its body unchanged; without this the template would not parse.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class ChatTemplateError(ValueError):
    """A template called `raise_exception(...)`, or failed to parse or render."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes non-ASCII and HTML characters; HF templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per distinct template string; rendering is then cheap."""
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}].role must be a string, got {role!r}")


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Render `template` the way transformers' `apply_chat_template(..., tokenize=False)` does.

    Extra keyword arguments (e.g. `enable_thinking`, `documents`) are visible to the template.
    Any template failure, including `raise_exception(...)` and sandbox violations, raises a ValueError.
    """
    if not isinstance(template, str) or not template:
        raise ValueError("chat template must be a non-empty string")
    validate_messages(messages)
    compiled = compile_chat_template(template)
    context = dict(kwargs)
    context.update(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "", eos_token=eos_token or "",
    )
    try:
        return compiled.render(**context)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
        # SecurityError, UndefinedError, or a template doing arithmetic on a missing field
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
