"""Chat templates: a model's Jinja template that turns messages into its prompt text.

The conventions are Hugging Face transformers' (`apply_chat_template`), so templates written for it render
the same here: a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the `loopcontrols`
extension, a `tojson` filter that keeps non-ASCII text, and the globals `raise_exception(message)` and
`strftime_now(format)`; the template sees `messages`, `add_generation_prompt`, and the special tokens
(`bos_token`, `eos_token`, ...) as strings.

    >>> template = ChatTemplate("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    ...                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    >>> template.render([{"role": "user", "content": "Hi"}])
    '<|user|>Hi<|assistant|>'
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence


class ChatTemplateError(ValueError):
    """A template that does not compile, that raised (raise_exception), or messages it cannot render."""


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


class ChatTemplate:
    """A compiled chat template; `special_tokens` ({"bos_token": "<s>", ...}) are passed to every render."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"a chat template must be a non-empty string, got {source!r}")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]).

        add_generation_prompt: end with the header of the assistant's turn (what generation continues).
        extra: more template variables (e.g. tools=[...]).  Raises ChatTemplateError for messages that are
        not a list of {"role": str, "content": ...} mappings, and when the template raises or fails."""
        import jinja2

        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} mappings, got {type(messages).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
                raise ChatTemplateError(f"message {i} must be a mapping with a string 'role' and a 'content', got {message!r}")
        try:
            return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **extra)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. "str + None" inside the template
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
