"""Rendering a Hugging Face chat template: a Jinja template that turns a list of messages into a model's prompt.

Templates come with downloaded models, so they are untrusted: they run in Jinja's immutable sandbox. The
environment follows the conventions templates are written for (``transformers``' ``apply_chat_template``): blocks
trimmed and left-stripped, ``raise_exception(message)``, ``strftime_now(format)``, a ``tojson`` filter that does
not escape HTML, and the special tokens (``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


@lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("rendering a chat template needs jinja2: pip install 'jinja2>=3.1.6'") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise ValueError(f"the chat template does not compile: {err}") from None


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool = True, tokens: dict | None = None
) -> str:
    """The text of ``messages`` ([{"role": ..., "content": ...}, ...]) under ``template``; ``tokens`` maps
    variable names such as ``eos_token`` to the special tokens' text."""
    from jinja2 import TemplateError

    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(tokens or {})
        )
    except TemplateError as err:
        raise ValueError(f"the chat template failed on these messages: {err}") from None
