"""Chat templates rendered as transformers renders them (`transformers/utils/chat_template_utils.py`).

The environment is the one transformers builds, so templates written for HF models give the same prompt text:
jinja2's ImmutableSandboxedEnvironment with trim_blocks + lstrip_blocks and the loop-controls extension
({% break %}, {% continue %}), a `tojson` filter that keeps non-ASCII characters (ensure_ascii=False) and accepts
indent / separators / sort_keys, and the globals `raise_exception(msg)` and `strftime_now(fmt)`. The variables are
`messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...). The rendered text is encoded without adding special tokens (the template writes them).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Optional, Sequence


class TemplateError(ValueError):
    """The template raised (raise_exception) or failed to render these messages: a 400 for the request."""


class _RaisedByTemplate(Exception):
    pass


def _raise_exception(message):
    raise _RaisedByTemplate(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: non-ASCII kept, and jinja's own tojson (which HTML-escapes <, >, &) replaced
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached by its text). A syntax error is a TemplateError naming the line."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def render(source: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
           special_tokens: Optional[dict] = None, tools: Optional[list] = None, documents: Optional[list] = None,
           **extra: Any) -> str:
    """The prompt text for `messages` (a list of {"role", "content", ...} dicts)."""
    import jinja2

    template = compile_template(source)
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(extra)
    try:
        return template.render(messages=list(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except _RaisedByTemplate as e:
        raise TemplateError(f"chat template: {e}") from None
    except jinja2.TemplateError as e:  # undefined attribute calls, sandbox violations, bad filters
        raise TemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # e.g. '+' on a str and a list
        raise TemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
