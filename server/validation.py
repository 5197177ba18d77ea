"""Checks shared by both API families: nulls as defaults, client text, unsupported and unknown fields,
lengths, JSON values."""
from __future__ import annotations

import json
import math
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from kvserve.server.errors import APIError

MAX_JSON_DEPTH = 16


class NullAsDefault(BaseModel):
    """A body where an explicit null means "use the default" (many clients send every field).
    Types are strict (no "5" for 5, no true for 1.0) and numbers finite (Python's json reads NaN)."""
    model_config = ConfigDict(allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None}
        return data


class ClientBody(NullAsDefault):
    """A whole request body: every string in it (keys too) must be encodable text, so a lone
    surrogate such as "\\ud800" is refused with the field's name instead of breaking the tokenizer
    or the JSON encoder of the answer."""

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        check_text(data)
        return data


def field_path(path: tuple) -> str:
    return ".".join(str(part) for part in path) or "body"


def _bad_text(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(data: Any, prefix: tuple = ()) -> None:
    """Raise a validation APIError naming the first string (or key) that is not valid Unicode text."""
    stack: list[tuple[tuple, Any]] = [(prefix, data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _bad_text(value):
                raise APIError("validation", f"{field_path(path)} holds a lone UTF-16 surrogate (such as \\ud800); "
                               "send valid Unicode text", param=field_path(path))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _bad_text(key):
                    raise APIError("validation", f"a key of {field_path(path)} holds a lone UTF-16 surrogate; "
                                   "send valid Unicode text", param=field_path(path))
                stack.append(((*path, key), item))
        elif isinstance(value, (list, tuple)):
            stack.extend(((*path, index), item) for index, item in enumerate(value))


def check_json_value(value: Any, name: str, max_chars: int) -> None:
    """Only plain JSON values (str, int, float, bool, None, lists and string-keyed dicts of them), at most
    MAX_JSON_DEPTH deep and `max_chars` characters as JSON."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError("validation", f"{name} is nested more than {MAX_JSON_DEPTH} levels deep", param=name)
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                raise APIError("validation", f"{name} must have string keys", param=name)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise APIError("validation", f"{name} must hold finite numbers", param=name)
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise APIError("validation", f"{name} may hold only JSON values, got {type(item).__name__}",
                           param=name)
    if len(json.dumps(value)) > max_chars:
        raise APIError("validation", f"{name} is larger than {max_chars} characters as JSON", param=name)


def reject_unsupported(checks: list[tuple[str, Any, bool]]) -> None:
    """Raise a validation APIError for the first (field, value, unsupported) that is unsupported."""
    for name, value, unsupported in checks:
        if unsupported:
            shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
            raise APIError("validation", f"{name}={shown} is not supported by kvserve; leave it unset "
                           "or at its default", param=name)


def reject_unknown(body: BaseModel, prefix: str = "") -> None:
    """Reject fields the schema does not know, unless they are null (clients send nulls freely)."""
    for name, value in (body.model_extra or {}).items():
        if value is not None:
            raise APIError("validation", f"unknown field {prefix}{name}; kvserve does not support it",
                           param=f"{prefix}{name}")


def resolve_max_tokens(prompt_len: int, max_model_len: int, requested: int | None, default: int | None,
                       name: str, prompt_param: str) -> int:
    """The output budget: `requested` if it fits, else a 4xx naming the lengths; default capped to fit."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError("validation", f"the prompt ({prompt_param}) has {prompt_len} tokens but this model accepts "
                       f"at most {max_model_len - 1} prompt tokens (max_model_len={max_model_len} including at "
                       "least one generated token)", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError("validation", f"the prompt ({prompt_param}) has {prompt_len} tokens and {name}={requested}, "
                       f"but this model accepts at most {max_model_len} tokens in total (max_model_len); set "
                       f"{name} to at most {room}", param=name, code="context_length_exceeded")
    return requested


def finite(value: float | None) -> float | None:
    """JSON has no inf or NaN: map them to null."""
    return value if value is not None and math.isfinite(value) else None


def random_seed() -> int:
    """A seed to report back when the client asked for sampling without one."""
    return secrets.randbits(31)
