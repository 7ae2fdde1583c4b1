"""`--chat-template`: a Jinja chat template given as a file or inline, as vLLM takes it."""

from __future__ import annotations

import os

# A template holds at least one of these; a value with none of them is meant as a path.
_JINJA_CHARS = "{}\n"


def load_chat_template(value: str) -> str:
    """The template text of `value`: the contents of the file it names, or `value` itself when
    it is inline Jinja. Raises ValueError (saying what to do) for a missing file or a template
    that does not parse."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
        where = value
    elif any(c in value for c in _JINJA_CHARS):
        template, where = value, "the inline --chat-template"
    else:
        raise ValueError(f"--chat-template {value!r}: no such file (pass a Jinja file, or the "
                         "template itself inline)")
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{where}: Jinja syntax error on line {exc.lineno}: {exc.message}") \
            from None
    return template


def apply_chat_template_override(tokenizer, value: str | None) -> None:
    """Make `value` (see load_chat_template) the template every chat request is rendered with:
    the tokenizer is the one place chat requests, /tokenize and LLM.chat read it from."""
    if value is not None:
        tokenizer.chat_template = load_chat_template(value)
