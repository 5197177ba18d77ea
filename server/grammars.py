"""Structured-output requests of both APIs as the engine's StructuredOutput: OpenAI's `response_format`
(json_schema, json_object) and TGI's `parameters.grammar` (json, json_schema, regex). Shapes are
checked here; whether the grammar compiles is checked off the event loop (inputs.check_grammar)."""
from __future__ import annotations

import json
from typing import Any

from kvserve import StructuredOutput
from kvserve.server.errors import APIError
from kvserve.server.validation import check_json_value

ANY_OBJECT = {"type": "object"}
MAX_GRAMMAR_CHARS = StructuredOutput.MAX_CHARS


def _refuse(message: str, param: str) -> APIError:
    return APIError("validation", message, param=param)


def schema_spec(schema: Any, param: str) -> StructuredOutput:
    """A JSON schema (an object, bounded like every client JSON value) as a StructuredOutput."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise _refuse(f"{param} must be a JSON schema (a JSON object)", param)
    check_json_value(schema, param, MAX_GRAMMAR_CHARS)
    return StructuredOutput.json_schema(schema)


def response_format_spec(response_format: dict[str, Any] | None) -> StructuredOutput | None:
    """OpenAI's response_format: {"type": "text"} (no grammar), {"type": "json_object"} (any JSON
    object), {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_schema(ANY_OBJECT)
    if kind != "json_schema":
        raise _refuse(f"response_format.type must be one of text, json_object, json_schema, got {kind!r}",
                      "response_format.type")
    inner = response_format.get("json_schema")
    if not isinstance(inner, dict):
        raise _refuse("response_format.json_schema must be an object with the schema under \"schema\"",
                      "response_format.json_schema")
    unknown = sorted(set(inner) - {"name", "schema", "strict", "description"})
    if unknown:
        raise _refuse(f"response_format.json_schema.{unknown[0]} is not a field of json_schema",
                      f"response_format.json_schema.{unknown[0]}")
    if "schema" not in inner:
        raise _refuse("response_format.json_schema.schema is required", "response_format.json_schema.schema")
    return schema_spec(inner["schema"], "response_format.json_schema.schema")


def tgi_grammar_spec(grammar: Any) -> StructuredOutput | None:
    """TGI's parameters.grammar: {"type": "json", "value": schema (an object or its JSON text)},
    {"type": "json_schema", "value": {"name", "schema"}} or {"type": "regex", "value": pattern}."""
    if grammar is None:
        return None
    param = "parameters.grammar"
    if not isinstance(grammar, dict) or set(grammar) != {"type", "value"}:
        raise _refuse(f"{param} must be an object with exactly the fields type and value", param)
    kind, value = grammar["type"], grammar["value"]
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise _refuse(f"{param}.value must be a non-empty regular expression string", f"{param}.value")
        if len(value) > MAX_GRAMMAR_CHARS:
            raise _refuse(f"{param}.value is longer than {MAX_GRAMMAR_CHARS} characters", f"{param}.value")
        return StructuredOutput("regex", value)
    if kind == "json":
        if isinstance(value, str):
            if len(value) > MAX_GRAMMAR_CHARS:
                raise _refuse(f"{param}.value is longer than {MAX_GRAMMAR_CHARS} characters", f"{param}.value")
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise _refuse(f"{param}.value is not valid JSON: {exc}", f"{param}.value") from None
        return schema_spec(value, f"{param}.value")
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise _refuse(f"{param}.value must be an object with the schema under \"schema\"", f"{param}.value")
        return schema_spec(value["schema"], f"{param}.value.schema")
    raise _refuse(f"{param}.type must be one of json, json_schema, regex, got {kind!r}", f"{param}.type")
