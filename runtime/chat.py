"""Chat templates: a model's Jinja template (GGUF `tokenizer.chat_template`, or `chat_template` in
tokenizer_config.json) rendered as transformers renders it (`apply_chat_template`): a sandboxed,
immutable Jinja environment with trim_blocks/lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, and the `{% generation %}` block."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from primasim.core.errors import CheckpointError, SpecError

from .tokenizer import Tokenizer

Message = dict[str, Any]


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): rendered as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, where: str = "chat template", **variables: Any) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...])."""
    try:
        tpl = _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"the chat template does not parse (line {exc.lineno}: {exc.message})", where=where,
                              fix="fix the template, or give one with --chat-template FILE") from None
    try:
        return tpl.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                          add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.SecurityError as exc:
        raise CheckpointError(f"the chat template tried an unsafe operation ({exc})", where=where,
                              fix="use a template that only formats messages") from None
    except jinja2.TemplateError as exc:  # raise_exception(...) in the template, undefined names, ...
        raise CheckpointError(f"the chat template failed: {exc}", where=where,
                              fix="check the messages' roles and order, or give another --chat-template") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"the chat template failed ({type(exc).__name__}: {exc})", where=where,
                              fix="check the template, or give another --chat-template") from None


def chat_prompt_ids(tok: Tokenizer, messages: Sequence[Message], *, template: str | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt: the template rendered, then encoded with special-token texts
    parsed (the template writes "<|eot_id|>" etc. as text); BOS is added only if the template did
    not write it already."""
    tpl = template if template is not None else tok.chat_template
    if not tpl:
        raise SpecError(f"the model's tokenizer has no chat template ({tok.source})", where="--chat",
                        fix="give one with --chat-template FILE (a Jinja file), or drop --chat and write the prompt "
                            "in the model's format")
    text = render_chat(tpl, messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
                       add_generation_prompt=add_generation_prompt,
                       where="--chat-template" if template is not None else "tokenizer.chat_template")
    starts_with_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
    return tok.encode(text, add_special=not starts_with_bos, parse_special=True)
