"""Tool calling on /v1/chat/completions: `tools` and `tool_choice` checked, the tools rendered through
the model's chat template, and the reply turned into OpenAI tool calls.

- "none": the tools are not shown to the model; a plain reply.
- "auto": the model decides; its own tool-call format is parsed out of the reply (server/tool_parsers.py,
  chosen by --tool-call-parser or from the chat template). A model whose format is unknown is a 400
  naming the flag.
- "required" / a named function: the grammar engine forces the reply to be calls (an array of
  {"name", "parameters"} objects, or the named function's arguments), so the arguments always fit
  the function's parameters schema. finish_reason is "tool_calls".
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvserve import StructuredOutput
from kvserve.server.errors import APIError
from kvserve.server.grammars import schema_spec
from kvserve.server.tool_parsers import (PARSERS, CallDelta, ContentDelta, ForcedCallsStream, NamedCallStream,
                                         ToolCall, ToolParser, detect_parser, named_schema, parse_forced_calls,
                                         required_schema)
from kvserve.server.validation import check_json_value

MAX_TOOLS = 128
MAX_TOOLS_CHARS = 256 * 1024
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")    # OpenAI's rule for function names
TOOL_FIELDS = {"type", "function"}
FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}


def _refuse(message: str, param: str) -> APIError:
    return APIError("validation", message, param=param)


@dataclass
class ToolPlan:
    """What a chat request does with its tools: how the reply is constrained and parsed."""
    mode: str = "none"                        # none, auto, required, named
    tools: list[dict] = field(default_factory=list)   # for the chat template (empty for "none")
    parser: ToolParser | None = None          # "auto": the model's own format
    name: str | None = None                   # "named": the function
    structured: StructuredOutput | None = None  # "required" / "named": the grammar of the reply

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole reply as (content, calls)."""
        if self.mode == "auto":
            parsed = self.parser.parse(text)
            return parsed.content, parsed.calls
        if self.mode == "required":
            return None, parse_forced_calls(text)
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        return text, []

    def stream(self) -> ReplyStream:
        return ReplyStream(self)


class ReplyStream:
    """The streamed reply as content deltas and call deltas (index, id and name on a call's first)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.ids: dict[int, str] = {}
        if plan.mode == "auto":
            self._inner = plan.parser.stream()
        elif plan.mode == "required":
            self._inner = ForcedCallsStream()
        elif plan.mode == "named":
            self._inner = NamedCallStream(plan.name)
        else:
            self._inner = None

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str) -> list[ContentDelta | CallDelta]:
        if self._inner is None:
            return [ContentDelta(text)] if text else []
        return self._seen(self._inner.feed(text))

    def finish(self) -> list[ContentDelta | CallDelta]:
        return [] if self._inner is None else self._seen(self._inner.finish())

    def _seen(self, events: list) -> list:
        for event in events:
            if isinstance(event, CallDelta) and event.index not in self.ids:
                self.ids[event.index] = call_id()
        return events


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_tools(tools: list[Any] | None) -> list[dict]:
    """OpenAI function tools, bounded: at most MAX_TOOLS, each {"type": "function", "function": {"name",
    "description", "parameters", "strict"}} with a unique name and a JSON-object parameters schema."""
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise _refuse(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed", "tools")
    check_json_value(tools, "tools", MAX_TOOLS_CHARS)
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _refuse(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        unknown = sorted(set(tool) - TOOL_FIELDS) or sorted(set(tool["function"]) - FUNCTION_FIELDS)
        if unknown:
            raise _refuse(f"{where} has an unknown field {unknown[0]!r}", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise _refuse(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}",
                          f"{where}.function.name")
        if name in names:
            raise _refuse(f"{where}.function.name {name!r} is used by another tool", f"{where}.function.name")
        names.add(name)
        if "parameters" in function:
            schema_spec(function["parameters"], f"{where}.function.parameters")   # a JSON object
        if not isinstance(function.get("description", ""), str):
            raise _refuse(f"{where}.function.description must be a string", f"{where}.function.description")
    return tools


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               chat_template: Any, parser_name: str | None) -> ToolPlan:
    """The request's ToolPlan; a 400 naming the field for anything it cannot do."""
    tools = check_tools(tools)
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return ToolPlan()
    if not tools:
        raise _refuse(f"tool_choice {choice!r} needs tools", "tool_choice")
    if choice == "auto":
        name = parser_name or detect_parser(_template_text(chat_template))
        if name is None:
            raise _refuse("tool_choice \"auto\" (the default with tools) needs the model's tool-call format, and "
                          "this model's chat template uses none kvserve knows: start the server with "
                          f"--tool-call-parser ({', '.join(PARSERS)}), or send tool_choice \"required\" or a named "
                          "function (enforced by the grammar engine)", "tool_choice")
        return ToolPlan("auto", tools, parser=PARSERS[name]())
    if choice == "required":
        schema = required_schema(tools)
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, structured=schema_spec(schema, "tools"))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(tool["function"]["name"] == name for tool in tools):
            raise _refuse(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
        return ToolPlan("named", tools, name=name, structured=schema_spec(named_schema(tools, name), "tools"))
    raise _refuse("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": "
                  "{\"name\": ...}}", "tool_choice")


def _template_text(chat_template: Any) -> str | None:
    """A tokenizer's chat template as text (a dict of named templates: its tool_use one, else default)."""
    if isinstance(chat_template, dict):
        return chat_template.get("tool_use") or chat_template.get("default")
    return chat_template if isinstance(chat_template, str) else None


def template_message(message: dict, tool_calls: list | None, tool_call_id: str | None) -> dict:
    """A history message for the chat template: an assistant's tool calls with their arguments as objects
    (templates write them with tojson), a tool result with its tool_call_id."""
    if tool_calls:
        calls = []
        for i, call in enumerate(tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _refuse("each tool call needs function.name", f"messages.tool_calls[{i}]")
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):
                where = f"messages.tool_calls[{i}].function.arguments"
                try:
                    arguments = json.loads(arguments or "{}")
                except (ValueError, RecursionError):
                    raise _refuse(f"tool_calls[{i}].function.arguments is not valid JSON", where) from None
                check_json_value(arguments, where, MAX_TOOLS_CHARS)
            calls.append({"id": call.get("id"), "type": "function",
                          "function": {"name": function["name"], "arguments": arguments}})
        message["tool_calls"] = calls
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message
