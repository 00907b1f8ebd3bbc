"""Tool calling on the chat API: OpenAI's `tools` and `tool_choice`, TGI's `tool_prompt`.

The call is forced by a grammar over the tools' schemas; its output is one compact JSON
object `{"name": <tool>, "arguments": {...}}`, returned as OpenAI's `tool_calls`. With
`tool_choice` "auto" the grammar also leaves plain text open: an answer that does not start
with `{` is text, one that does must be a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from common.grammar import JSON, LARK, GrammarSpec
from router.validation import ValidationError

DEFAULT_TOOL_PROMPT = (
    "You can call one of the functions below. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <its arguments>}.'
)
# the start of a call's JSON up to its arguments (the grammar writes it compactly, in order)
_CALL_HEAD = re.compile(r'\s*\{"name":"((?:[^"\\]|\\.)*)","arguments":')


@dataclass(frozen=True, slots=True)
class ToolPlan:
    tools: list[dict]  # as OpenAI sends them: {"type": "function", "function": {...}}
    functions: list[dict]  # their `function` parts, checked, with `parameters` filled in
    grammar: GrammarSpec
    text_allowed: bool  # tool_choice "auto"


def _function(tool: object) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ValidationError('each tool must be {"type": "function", "function": {...}}')
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValidationError("each tool's `function` needs a `name`")
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict):
        raise ValidationError(f"the parameters of tool {function['name']!r} must be a schema")
    return {**function, "parameters": parameters}


def _chosen(functions: list[dict], tool_choice: object) -> tuple[list[dict], bool] | None:
    """The tools a call may use and whether text stays open; None: no call (choice "none")."""
    if tool_choice in (None, "auto"):
        return functions, True
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return functions, False
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise ValidationError(f"`tool_choice` names {name!r}, which is not in `tools`")
        return named, False
    raise ValidationError(
        '`tool_choice` must be "auto", "none", "required" or '
        '{"type": "function", "function": {"name": ...}}'
    )


def _arguments(parameters: dict) -> dict:
    """A tool's parameters schema; keys it does not name are closed unless it opens them
    (as TGI: otherwise a small model keeps inventing arguments until max_tokens)."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def call_schema(functions: list[dict]) -> dict:
    """A call of any one of `functions`: {"name": <its name>, "arguments": <its schema>}."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _arguments(f["parameters"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def plan_tools(tools: list | None, tool_choice: object) -> ToolPlan | None:
    """The request's tools and the grammar that forces their calls; None without tools or
    with tool_choice "none". 422 for a malformed tool or an unknown name in tool_choice."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValidationError("`tool_choice` needs `tools`")
        return None
    functions = [_function(t) for t in tools]
    chosen = _chosen(functions, tool_choice)
    if chosen is None:
        return None
    used, text_allowed = chosen
    schema = json.dumps(call_schema(used))
    if not text_allowed:
        return ToolPlan(tools, functions, GrammarSpec(JSON, schema), False)
    # text that does not open with "{" (after any spaces), or a call
    lark = (
        "start: text | call\n"
        r"text: /\s*[^{\s][\s\S]*/" + "\n"
        'call: %json { "x-guidance": {"whitespace_flexible": false}, "allOf": [' + schema + "] }\n"
    )
    return ToolPlan(tools, functions, GrammarSpec(LARK, lark), True)


def tools_in_prompt(messages: list[dict], plan: ToolPlan, tool_prompt: str | None) -> None:
    """For a template that does not take `tools`: the tools, after the tool prompt, at the
    end of the last message (TGI's way)."""
    listing = "\n".join(json.dumps(f) for f in plan.functions)
    last = messages[-1]
    last["content"] = (
        f"{last.get('content') or ''}\n\n{tool_prompt or DEFAULT_TOOL_PROMPT}\n{listing}"
    )


def parse_call(text: str) -> dict | None:
    """OpenAI's tool call from a generated call; None when the text is not one (plain text
    under "auto", or a call cut short by max_tokens)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))},
    }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallStreamer:
    """Turns the streamed text of a tool-enabled chat into OpenAI deltas: plain content, or
    one tool call (its id and name first, then its arguments in pieces). The text is a call
    when it opens with `{` (the grammar then makes it one); the call's closing `}` is held
    back, as it belongs to the wrapper, not to the arguments."""

    def __init__(self) -> None:
        self.text = ""
        self.mode: str | None = None  # None until known, "content" or "call"
        self.sent = 0  # characters of the arguments sent
        self.named = False  # the call's id and name were sent
        self.call_id = new_call_id()

    def push(self, piece: str, finished: bool) -> list[dict[str, Any]]:
        """The deltas that `piece` (and the end, when `finished`) releases."""
        self.text += piece
        if self.mode is None:
            stripped = self.text.lstrip()
            if not stripped:
                return []
            self.mode = "call" if stripped.startswith("{") else "content"
            if self.mode == "content":
                return [{"content": self.text}]
        if self.mode == "content":
            return [{"content": piece}] if piece else []
        return self._call_deltas(finished)

    def _call_deltas(self, finished: bool) -> list[dict[str, Any]]:
        head = _CALL_HEAD.match(self.text)
        if head is None:
            return []
        deltas: list[dict[str, Any]] = []
        if not self.named:
            self.named = True
            name = json.loads(f'"{head.group(1)}"')
            call = {"index": 0, "id": self.call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}  # fmt: skip
            deltas.append({"tool_calls": [call]})
        # the last character is (at the end) or may be (before it) the wrapper's "}"
        ready = self.text[head.end() : -1]
        if len(ready) > self.sent:
            deltas.append({"tool_calls": [{"index": 0, "function": {
                "arguments": ready[self.sent :]}}]})  # fmt: skip
            self.sent = len(ready)
        return deltas

    @property
    def is_call(self) -> bool:
        return self.mode == "call" and _CALL_HEAD.match(self.text) is not None
