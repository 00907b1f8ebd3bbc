"""Chat templates rendered with jinja2 in a sandbox, as transformers renders them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.validation import ValidationError


def load_template(tokenizer_dir: str | Path) -> str | None:
    """The chat template from chat_template.jinja or tokenizer_config.json, if any."""
    tokenizer_dir = Path(tokenizer_dir)
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    config_file = tokenizer_dir / "tokenizer_config.json"
    if config_file.exists():
        template = json.loads(config_file.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: json.dumps with its options, non-ASCII kept as is."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    """The environment transformers gives templates: sandboxed, `loopcontrols` (break and
    continue), `raise_exception`, `strftime_now` and its `tojson`. A template that does not
    compile raises TemplateError at construction (the router's start-up names it)."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self._special_tokens = special_tokens
        self.takes_tools = "tools" in source  # renders a `tools` list itself

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, **self._special_tokens, **extra
            )
        except TemplateError as exc:
            raise ValidationError(f"chat template error: {exc}") from exc
