"""Tool calls in a model's own output format: parse them out of the generated text (OpenAI tool_choice "auto").

A model that supports tools writes its calls in the format its chat template taught it. Three are supported:

- ``"hermes"`` (Hermes, Qwen2.5, Qwen3)::

      Let me check.
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  Any number of blocks; text outside the blocks is the message content. A last block left unclosed (the output
  ended, e.g. at max_tokens) still counts when its JSON is complete.
- ``"llama3_json"`` (Llama 3.1 / 3.2 / 3.3 JSON tool calling): the whole output is ``{"name": ..., "parameters":
  {...}}`` (``"arguments"`` is accepted too), optionally after ``<|python_tag|>``, several calls separated by
  ``;``. It is a tool call only when the stripped output starts with ``{`` or ``<|python_tag|>``; a model answering
  with a JSON object of its own (no ``"name"``) is content.
- ``"mistral"``: ``[TOOL_CALLS]`` then either a JSON array ``[{"name": ..., "arguments": {...}}, ...]`` (templates
  before v11) or ``name[ARGS]{...}`` (v11+; also ``name[CALL_ID]id[ARGS]{...}`` and, where ``[ARGS]`` was lost,
  ``name{...}``), possibly several ``[TOOL_CALLS]`` segments.

  ``[TOOL_CALLS]`` (and ``[ARGS]``) are *special* tokens of Mistral tokenizers: the text given to this parser must be
  decoded with ``skip_special_tokens=False`` or the marker is gone (``MistralParser.needs_special_tokens``). Qwen's
  ``<tool_call>`` is an ordinary added token and survives; Llama's ``<|python_tag|>`` is optional here.

API::

    parser = PARSERS[detect_parser(tokenizer.chat_template)]()
    parsed = parser.parse(text)               # ParsedOutput(content, calls=[ToolCall(name, arguments), ...])

    stream = parser.stream()
    for delta_text in deltas:
        for event in stream.feed(delta_text): ...   # ContentDelta(text) | CallDelta(index, name, arguments)
    for event in stream.finish(): ...

Decisions shared by all formats (``parse`` and ``stream`` agree on every one; the tests check the concatenated stream
against ``parse`` for many splits of each example, down to one character at a time):

- A call is ``ToolCall(name, arguments)``: ``arguments`` is the compact JSON text of the arguments object
  (``json.dumps(obj, ensure_ascii=False, separators=(",", ":"))``; a JSON *string* holding an object is decoded
  first; missing or null arguments are ``{}``). A call needs a non-empty string name and object arguments; the names
  are not checked against the request's tools (the caller's job).
- A block the model botched (invalid JSON, no name, arguments not an object, NaN/Infinity, unclosed JSON) is not a
  call: its text stays in the content, verbatim, marker included. No exception escapes ``parse``/``feed``/``finish``.
- Without any call the content is the full text, untouched (``""`` for empty output). With calls, each run of text
  between calls loses the whitespace on its sides that touch a call, empty runs are dropped, and the remaining runs
  are joined with ``"\\n"``; content is None when nothing remains. So ``"Sure.\\n<tool_call>...</tool_call>\\n"``
  gives content ``"Sure."``.
- Streaming holds back text that may still become a marker (a trailing ``<tool_c``, ``[TOOL_C``, a leading
  ``<|python_``) and trailing whitespace that a following call would remove, releasing it as soon as it is clear, or
  at ``finish()``. A call is emitted whole, as one ``CallDelta(index, name, arguments)``, once its block is complete
  and known to be valid; emitting the name earlier would commit to a call before knowing whether the block is valid.

Forced calls (tool_choice "required" or a named function) are not parsed from a model's format: a grammar constrains
the output. ``required_schema(tools)`` is the schema for "required" (a JSON array of ``{"name", "parameters"}``
objects) and ``ForcedCallsStream`` turns that output into call deltas as it streams, name first, then the parameters
object's text verbatim in fragments. For a named function the output *is* the arguments object (``named_schema``
gives its schema): ``NamedCallStream`` passes each delta on as an argument fragment.

Stdlib only; no kvserve imports.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Union

__all__ = [
    "PARSERS", "CallDelta", "ContentDelta", "Event", "ForcedCallsStream", "HermesParser", "Llama3JsonParser",
    "MistralParser", "NamedCallStream", "ParsedOutput", "ToolCall", "ToolCallStream", "ToolParser", "detect_parser",
    "named_schema", "parse_forced_calls", "required_schema",
]


# --------------------------------------------------------------------------------------------------------------------
# Results and events


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text (an object)."""
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    """A whole output split into message content (None when there is none besides the calls) and calls."""
    content: str | None
    calls: list[ToolCall]


@dataclass(frozen=True)
class ContentDelta:
    """Streaming: more message content."""
    text: str


@dataclass(frozen=True)
class CallDelta:
    """Streaming: part of call ``index`` (0, 1, ... in output order). ``name`` is set on a call's first delta only
    (None after); ``arguments`` is a fragment: a call's fragments concatenated are its arguments JSON text."""
    index: int
    name: str | None
    arguments: str


Event = Union[ContentDelta, CallDelta]


# --------------------------------------------------------------------------------------------------------------------
# JSON helpers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# strict JSON: NaN / Infinity / -Infinity (which Python's json accepts) make a block invalid
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_BAD = object()  # "not valid JSON"


def _loads(text: str) -> Any:
    """The JSON value of text (surrounding JSON whitespace allowed), or _BAD."""
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return _BAD


def _decode_at(text: str, pos: int) -> tuple[Any, int] | None:
    """(value, end) for the JSON value starting exactly at text[pos], or None."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _make_call(obj: Any, arg_keys: tuple[str, ...]) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name": ..., <arg_key>: {...}}`` object, or None when it is not one.

    The first of arg_keys present holds the arguments: an object, a JSON string holding an object, or missing / null
    / "" for no arguments."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args: Any = None
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):
        args = _loads(args) if args.strip() else None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    try:
        return ToolCall(name, _compact(args))
    except (ValueError, TypeError, RecursionError):
        return None


class _JsonScanner:
    """Finds where a JSON object or array that starts at ``start`` ends, reading text as it grows.

    Tracks strings (with backslash escapes) and bracket depth, ``{}`` and ``[]`` alike; on valid JSON it returns
    exactly the end of the value, on invalid JSON some end or none (the caller then decodes the slice, which fails).
    """

    def __init__(self, start: int):
        self.start = start
        self._pos = start
        self._depth = 0
        self._in_string = False
        self._escape = False

    def scan(self, text: str) -> int | None:
        """Index just past the value's closing bracket, or None when text does not reach it yet."""
        pos, depth, in_string, escape = self._pos, self._depth, self._in_string, self._escape
        n = len(text)
        end = None
        while pos < n:
            c = text[pos]
            pos += 1
            if in_string:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth <= 0:
                    end = pos
                    break
        self._pos, self._depth, self._in_string, self._escape = pos, depth, in_string, escape
        return end


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that is the beginning (not the whole) of marker: text to hold back."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _assemble(items: list[str | ToolCall]) -> ParsedOutput:
    """ParsedOutput from the output cut into text pieces and calls, in order (the content rule: module docstring)."""
    calls = [item for item in items if isinstance(item, ToolCall)]
    if not calls:
        return ParsedOutput("".join(item for item in items if isinstance(item, str)), [])
    pieces: list[str] = []
    run: list[str] = []
    after_call = False
    for item in [*items, None]:  # None: the end, closing the last run
        if isinstance(item, str):
            run.append(item)
            continue
        text = "".join(run)
        if after_call:
            text = text.lstrip()
        if item is not None:
            text = text.rstrip()
        if text:
            pieces.append(text)
        run = []
        after_call = True
    return ParsedOutput("\n".join(pieces) or None, calls)


# --------------------------------------------------------------------------------------------------------------------
# Streaming base


class _ContentShaper:
    """Streams content by the rule ``_assemble`` applies to a whole output: whitespace touching a call is dropped,
    runs separated by calls are joined with a newline. Trailing whitespace waits until it is clear whether a call
    follows it."""

    def __init__(self) -> None:
        self._held = ""  # trailing whitespace of the content so far
        self._after_call = False  # a call came last: leading whitespace is dropped
        self._emitted = False

    def text(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
            if self._emitted:
                text = "\n" + text
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            out.append(ContentDelta(body))
            self._emitted = True

    def call(self) -> None:
        self._held = ""
        self._after_call = True

    def finish(self, out: list[Event]) -> None:
        if self._held:
            out.append(ContentDelta(self._held))
            self._held = ""


class ToolCallStream:
    """Incremental parsing of one output: ``feed`` each new piece of text, then ``finish`` once at the end.

    Both return events: ``ContentDelta`` and ``CallDelta``, adjacent content merged into one delta. Together they
    give exactly what the parser's ``parse`` gives for the whole text: the content deltas concatenated are its content
    (``""`` standing for None) and the call deltas its calls."""

    def __init__(self) -> None:
        self._buf = ""
        self._shaper = _ContentShaper()
        self._out: list[Event] = []
        self._n_calls = 0
        self._finished = False

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if delta:
            self._buf += delta
            self._step(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """The held-back text and any last call; a second call returns nothing."""
        if self._finished:
            return []
        self._finished = True
        self._step(final=True)
        self._shaper.finish(self._out)
        return self._take()

    def _step(self, final: bool) -> None:  # the format: consume self._buf as far as it can be decided
        raise NotImplementedError

    def _content(self, text: str) -> None:
        self._shaper.text(text, self._out)

    def _call(self, call: ToolCall) -> None:
        self._shaper.call()
        self._out.append(CallDelta(self._n_calls, call.name, call.arguments))
        self._n_calls += 1

    def _take(self) -> list[Event]:
        out: list[Event] = []
        for event in self._out:
            if isinstance(event, ContentDelta) and out and isinstance(out[-1], ContentDelta):
                out[-1] = ContentDelta(out[-1].text + event.text)
            else:
                out.append(event)
        self._out = []
        return out


class ToolParser:
    """A model format's parser. Stateless: one instance may serve any number of outputs."""

    name: ClassVar[str] = ""
    # True when the format's markers are special tokens: decode with skip_special_tokens=False
    needs_special_tokens: ClassVar[bool] = False

    def parse(self, text: str) -> ParsedOutput:
        """Content and calls of a whole output."""
        raise NotImplementedError

    def stream(self) -> ToolCallStream:
        """A fresh incremental parser for one output."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------------
# hermes


_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"


def _hermes_call(body: str) -> ToolCall | None:
    return _make_call(_loads(body.strip()), ("arguments", "parameters"))


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"

    def parse(self, text: str) -> ParsedOutput:
        items: list[str | ToolCall] = []
        pos = 0
        while True:
            start = text.find(_HERMES_OPEN, pos)
            if start < 0:
                items.append(text[pos:])
                break
            items.append(text[pos:start])
            body_start = start + len(_HERMES_OPEN)
            close = text.find(_HERMES_CLOSE, body_start)
            end = len(text) if close < 0 else close + len(_HERMES_CLOSE)
            call = _hermes_call(text[body_start:len(text) if close < 0 else close])
            items.append(call if call is not None else text[start:end])
            pos = end
        return _assemble(items)

    def stream(self) -> ToolCallStream:
        return _HermesStream()


class _HermesStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self._in_block = False  # self._buf holds a block's text after <tool_call>
        self._search_from = 0  # where in the block to look for </tool_call> next

    def _step(self, final: bool) -> None:
        while True:
            if not self._in_block:
                start = self._buf.find(_HERMES_OPEN)
                if start < 0:
                    cut = len(self._buf) - (0 if final else _partial_suffix(self._buf, _HERMES_OPEN))
                    self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                self._content(self._buf[:start])
                self._buf = self._buf[start + len(_HERMES_OPEN):]
                self._in_block, self._search_from = True, 0
                continue
            close = self._buf.find(_HERMES_CLOSE, self._search_from)
            if close < 0:
                if not final:
                    self._search_from = max(0, len(self._buf) - len(_HERMES_CLOSE) + 1)
                    return
                body, raw_end, rest_start = self._buf, "", len(self._buf)
            else:
                body, raw_end, rest_start = self._buf[:close], _HERMES_CLOSE, close + len(_HERMES_CLOSE)
            call = _hermes_call(body)
            if call is not None:
                self._call(call)
            else:
                self._content(_HERMES_OPEN + body + raw_end)
            self._buf = self._buf[rest_start:]
            self._in_block = False


# --------------------------------------------------------------------------------------------------------------------
# llama3_json


_PYTHON_TAG = "<|python_tag|>"
_LLAMA_SEPARATORS = ";"


def _llama_call(obj: Any) -> ToolCall | None:
    return _make_call(obj, ("parameters", "arguments"))


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] in _LLAMA_SEPARATORS):
        pos += 1
    return pos


class Llama3JsonParser(ToolParser):
    """Llama 3.x JSON tool calling: the output is ``[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]``.

    Calls are read one after another; the first thing that is not a valid call ends them, and it and everything
    after it is content (leading separators dropped). With no call at all the content is the full text."""

    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        stripped = text.lstrip()
        if stripped.startswith(_PYTHON_TAG):
            pos = len(text) - len(stripped) + len(_PYTHON_TAG)
        elif stripped.startswith("{"):
            pos = len(text) - len(stripped)
        else:
            return ParsedOutput(text, [])
        calls: list[ToolCall] = []
        end = pos
        while True:
            pos = _skip_separators(text, end)
            if pos >= len(text) or text[pos] != "{":
                break
            decoded = _decode_at(text, pos)
            call = _llama_call(decoded[0]) if decoded is not None else None
            if call is None:
                break
            calls.append(call)
            end = decoded[1]
        if not calls:
            return ParsedOutput(text, [])
        return _assemble([*calls, text[_skip_separators(text, end):]])

    def stream(self) -> ToolCallStream:
        return _Llama3Stream()


class _Llama3Stream(ToolCallStream):
    # states: "start" (deciding from the first characters), "between" (skipping whitespace and ";" before the next
    # call), "object" (scanning a call's JSON), "rest" (everything left is content)
    def __init__(self) -> None:
        super().__init__()
        self._state = "start"
        self._pos = 0  # in self._buf: where "between" has skipped to / where the object starts
        self._scanner: _JsonScanner | None = None

    def _fail(self) -> None:
        """What starts at self._pos is not a call: content from there (from the very start, without any call)."""
        start = 0 if self._n_calls == 0 else self._pos
        self._buf = self._buf[start:]
        self._state = "rest"

    def _step(self, final: bool) -> None:
        while True:
            if self._state == "rest":
                self._content(self._buf)
                self._buf = ""
                return
            if self._state == "start":
                stripped = self._buf.lstrip()
                lead = len(self._buf) - len(stripped)
                if stripped.startswith(_PYTHON_TAG):
                    self._state, self._pos = "between", lead + len(_PYTHON_TAG)
                elif stripped.startswith("{"):
                    self._state, self._pos = "between", lead
                elif not final and (not stripped or _PYTHON_TAG.startswith(stripped)):
                    return  # only whitespace, or a partial <|python_tag|>, so far
                else:
                    self._state = "rest"
                continue
            if self._state == "between":
                self._pos = _skip_separators(self._buf, self._pos)
                if self._pos >= len(self._buf):
                    if final:
                        self._fail()
                        continue
                    return
                if self._buf[self._pos] != "{":
                    self._fail()
                    continue
                self._state, self._scanner = "object", _JsonScanner(self._pos)
            assert self._scanner is not None
            end = self._scanner.scan(self._buf)
            if end is None:
                if final:
                    self._fail()
                    continue
                return
            call = _llama_call(_loads(self._buf[self._pos:end]))
            if call is None:
                self._fail()
                continue
            self._call(call)
            self._buf, self._pos, self._state = self._buf[end:], 0, "between"


# --------------------------------------------------------------------------------------------------------------------
# mistral


_MISTRAL_MARK = "[TOOL_CALLS]"
_MISTRAL_ARGS = "[ARGS]"
_MISTRAL_CALL_ID = "[CALL_ID]"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_MORE = "more"  # _mistral_head: the text ends before the head can be decided
_INVALID = "invalid"


def _mistral_head(text: str, pos: int, final: bool) -> tuple[str, int] | str:
    """Reads ``name[CALL_ID]id[ARGS]`` (id and [ARGS] optional) then whitespace from text[pos]: (name, index of the
    ``{`` that follows), or _INVALID, or _MORE when text ends first (never when final)."""
    need_more = _INVALID if final else _MORE
    n = len(text)
    q = pos
    while q < n and text[q] in _NAME_CHARS:
        q += 1
    if q == n:
        return need_more
    if q == pos:
        return _INVALID
    name = text[pos:q]
    if text.startswith(_MISTRAL_CALL_ID, q):
        q += len(_MISTRAL_CALL_ID)
        id_start = q
        while q < n and text[q] in _ID_CHARS:
            q += 1
        if q == n:
            return need_more
        if q == id_start:
            return _INVALID
    for marker in (_MISTRAL_CALL_ID, _MISTRAL_ARGS):
        if n - q < len(marker) and marker.startswith(text[q:]):
            return need_more  # text ends inside what may be a marker
    if text.startswith(_MISTRAL_ARGS, q):
        q += len(_MISTRAL_ARGS)
    while q < n and text[q].isspace():
        q += 1
    if q == n:
        return need_more
    return (name, q) if text[q] == "{" else _INVALID


def _mistral_array_calls(value: Any) -> list[ToolCall] | None:
    if not isinstance(value, list) or not value:
        return None
    calls = [_make_call(item, ("arguments", "parameters")) for item in value]
    return None if any(call is None for call in calls) else calls  # type: ignore[return-value]


def _mistral_named_call(name: str, value: Any) -> ToolCall | None:
    return _make_call({"name": name, "arguments": value}, ("arguments",)) if isinstance(value, dict) else None


class MistralParser(ToolParser):
    """``[TOOL_CALLS]`` then a JSON array of calls, or ``name[ARGS]{...}`` (v11+), any number of segments.

    A ``[TOOL_CALLS]`` not followed by a valid group stays in the content and the search goes on after it."""

    name = "mistral"
    needs_special_tokens = True

    @staticmethod
    def _group(text: str, pos: int) -> tuple[list[ToolCall], int] | None:
        """The calls right after a [TOOL_CALLS] that ends at pos, and where they end; None when invalid."""
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return None
        if text[pos] == "[":
            decoded = _decode_at(text, pos)
            calls = _mistral_array_calls(decoded[0]) if decoded is not None else None
            return (calls, decoded[1]) if calls is not None and decoded is not None else None
        head = _mistral_head(text, pos, final=True)
        if isinstance(head, str):
            return None
        decoded = _decode_at(text, head[1])
        call = _mistral_named_call(head[0], decoded[0]) if decoded is not None else None
        return ([call], decoded[1]) if call is not None and decoded is not None else None

    def parse(self, text: str) -> ParsedOutput:
        items: list[str | ToolCall] = []
        pos = 0
        while True:
            start = text.find(_MISTRAL_MARK, pos)
            if start < 0:
                items.append(text[pos:])
                break
            items.append(text[pos:start])
            group = self._group(text, start + len(_MISTRAL_MARK))
            if group is None:
                items.append(_MISTRAL_MARK)
                pos = start + len(_MISTRAL_MARK)
            else:
                items.extend(group[0])
                pos = group[1]
        return _assemble(items)

    def stream(self) -> ToolCallStream:
        return _MistralStream()


class _MistralStream(ToolCallStream):
    # states: "content"; "segment" (self._buf starts with [TOOL_CALLS]: deciding which form follows); "array" and
    # "object" (scanning the JSON from self._scanner.start; for "object", self._name is the call's name)
    def __init__(self) -> None:
        super().__init__()
        self._state = "content"
        self._scanner: _JsonScanner | None = None
        self._name = ""

    def _invalid(self) -> None:
        """The [TOOL_CALLS] at the start of self._buf begins no valid group: it is content; search on after it."""
        self._content(_MISTRAL_MARK)
        self._buf = self._buf[len(_MISTRAL_MARK):]
        self._state = "content"

    def _step(self, final: bool) -> None:
        while True:
            if self._state == "content":
                start = self._buf.find(_MISTRAL_MARK)
                if start < 0:
                    cut = len(self._buf) - (0 if final else _partial_suffix(self._buf, _MISTRAL_MARK))
                    self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                self._content(self._buf[:start])
                self._buf = self._buf[start:]
                self._state = "segment"
                continue
            if self._state == "segment":
                pos = len(_MISTRAL_MARK)
                while pos < len(self._buf) and self._buf[pos].isspace():
                    pos += 1
                if pos >= len(self._buf):
                    if final:
                        self._invalid()
                        continue
                    return
                if self._buf[pos] == "[":
                    self._state, self._scanner = "array", _JsonScanner(pos)
                    continue
                head = _mistral_head(self._buf, pos, final)
                if head == _MORE:
                    return
                if isinstance(head, str):
                    self._invalid()
                    continue
                self._name = head[0]
                self._state, self._scanner = "object", _JsonScanner(head[1])
                continue
            assert self._scanner is not None
            end = self._scanner.scan(self._buf)
            if end is None:
                if final:
                    self._invalid()
                    continue
                return
            value = _loads(self._buf[self._scanner.start:end])
            if self._state == "array":
                calls = _mistral_array_calls(value)
            else:
                call = _mistral_named_call(self._name, value)
                calls = [call] if call is not None else None
            if calls is None:
                self._invalid()
                continue
            for call in calls:
                self._call(call)
            self._buf = self._buf[end:]
            self._state = "content"


# --------------------------------------------------------------------------------------------------------------------
# Registry and template detection


PARSERS: dict[str, type[ToolParser]] = {
    HermesParser.name: HermesParser,
    Llama3JsonParser.name: Llama3JsonParser,
    MistralParser.name: MistralParser,
}


def detect_parser(chat_template: str | None) -> str | None:
    """The PARSERS name for the tool-call format a chat template teaches, or None when it is not one of them.

    - ``<tool_call>`` -> "hermes" (but None for the XML formats that share the tag: Qwen3-Coder's
      ``<function=...>``, GLM-4.5's ``<arg_key>``);
    - ``[TOOL_CALLS]`` -> "mistral";
    - ``<|python_tag|>``, or a Llama 3 template (``<|start_header_id|>``) with its JSON tool-calling instructions
      ("Given the following functions" or a ``"parameters"`` JSON key) -> "llama3_json".

    Pass the template that is used with tools (a tokenizer with several named templates: its "tool_use" one)."""
    if not isinstance(chat_template, str) or not chat_template:
        return None
    t = chat_template
    if "<tool_call>" in t:
        return None if "<function=" in t or "<arg_key>" in t else "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t:
        return "llama3_json"
    if "<|start_header_id|>" in t and (
            "Given the following functions" in t or '"parameters"' in t or '\\"parameters\\"' in t):
        return "llama3_json"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Forced calls: tool_choice "required" / a named function, under a grammar


def _tool_function(tool: Any) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ValueError(f"not a function tool: {tool!r:.200}")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"a function tool needs function.name: {tool!r:.200}")
    return function


def _parameters_schema(function: dict) -> dict:
    parameters = function.get("parameters")
    return copy.deepcopy(parameters) if isinstance(parameters, dict) and parameters else {"type": "object"}


def required_schema(tools: list[dict]) -> dict:
    """JSON schema of the output for tool_choice "required": a non-empty array of calls, each
    ``{"name": <one tool's name>, "parameters": <that tool's parameters>}`` in that key order.

    tools are OpenAI tool dicts ``{"type": "function", "function": {"name", "description", "parameters"}}``; a tool
    without parameters takes any object. ValueError when tools is empty or a tool is malformed. The parameters
    schemas are copied."""
    if not tools:
        raise ValueError("tool_choice 'required' needs at least one tool")
    variants = []
    for tool in tools:
        function = _tool_function(tool)
        variants.append({
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": function["name"]},
                "parameters": _parameters_schema(function),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    return {"type": "array", "minItems": 1, "items": {"anyOf": variants}}


def named_schema(tools: list[dict], name: str) -> dict:
    """JSON schema of the output for a named tool_choice: the named tool's parameters (any object when it has
    none). ValueError when no tool has that name."""
    for tool in tools:
        function = _tool_function(tool)
        if function["name"] == name:
            return _parameters_schema(function)
    raise ValueError(f"no function tool is named {name!r}")


class ForcedCallsStream:
    """Call deltas from the streamed output of a ``required_schema`` grammar:
    ``[{"name": "f", "parameters": {...}}, ...]``.

    ``CallDelta(index, name, "")`` as soon as an element's name string is complete, then the ``"parameters"``
    object's text, verbatim, in fragments as it arrives (at most one per call per feed), until that object closes.
    The input is assumed well-formed so far (the grammar's job), keys in the order name, parameters, whitespace
    anywhere JSON allows it; should parameters come first, its text is held and sent with the name. ``calls`` gives
    the calls seen so far, ``closed`` whether the array ended."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string: list[str] | None = None  # a string of an element object being read (a key or the name)
        self._expect_key = False  # in an element object: the next string is a key
        self._key: str | None = None  # the key whose value comes next
        self._index = -1  # the current element
        self._named = False  # the current element's name was sent
        self._params: list[str] | None = None  # the parameters text of this feed, while inside it
        self._pending = ""  # parameters text before the name
        self._records: list[list[Any]] = []  # [name | None, arguments] per element
        self._closed = False
        self._out: list[CallDelta] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls so far (named elements; arguments complete once their object closed)."""
        return [ToolCall(name, args) for name, args in self._records if name is not None]

    @property
    def closed(self) -> bool:
        """Whether the top-level array has closed (False at the end means a truncated output)."""
        return self._closed

    def feed(self, delta: str) -> list[CallDelta]:
        for c in delta:
            self._char(c)
        self._flush_params()
        out, self._out = self._out, []
        return out

    def finish(self) -> list[CallDelta]:
        """Nothing is held back at the end of a feed: always []."""
        self._flush_params()
        out, self._out = self._out, []
        return out

    def _flush_params(self) -> None:
        if self._params:  # None outside the parameters object
            self._args("".join(self._params))
            self._params = []

    def _args(self, text: str) -> None:
        self._records[self._index][1] += text
        if self._named:
            self._out.append(CallDelta(self._index, None, text))
        else:
            self._pending += text

    def _char(self, c: str) -> None:
        if self._closed:
            return
        capturing = self._params is not None
        if capturing:
            self._params.append(c)  # type: ignore[union-attr]
        if self._in_string:
            if self._string is not None:
                self._string.append(c)
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if self._string is not None:
                    self._string_done("".join(self._string))
                    self._string = None
            return
        if c == '"':
            self._in_string = True
            if self._depth == 2 and not capturing:
                self._string = ['"']
        elif c in "{[":
            self._depth += 1
            if self._depth == 2 and c == "{":  # a new element
                self._index += 1
                self._records.append([None, ""])
                self._expect_key, self._key, self._named, self._pending = True, None, False, ""
            elif self._depth == 3 and not capturing and c == "{" and self._key == "parameters" \
                    and not self._expect_key:
                self._params = [c]
        elif c in "}]":
            if capturing and self._depth == 3:  # the parameters object closes
                self._flush_params()
                self._params = None
            self._depth -= 1
            if self._depth == 0:
                self._closed = True
        elif self._depth == 2 and not capturing:
            if c == ":":
                self._expect_key = False
            elif c == ",":
                self._expect_key, self._key = True, None

    def _string_done(self, literal: str) -> None:
        value = _loads(literal)
        if not isinstance(value, str):
            return
        if self._expect_key:
            self._key = value
        elif self._key == "name" and not self._named:
            self._records[self._index][0] = value
            self._named = True
            self._out.append(CallDelta(self._index, value, self._pending))
            self._pending = ""


def parse_forced_calls(text: str) -> list[ToolCall]:
    """The calls of a whole ``required_schema`` output, exactly as ``ForcedCallsStream`` streams them (arguments
    verbatim). A truncated output gives the calls named so far, the last one's arguments possibly cut short."""
    stream = ForcedCallsStream()
    stream.feed(text)
    return stream.calls


class NamedCallStream:
    """A named tool_choice: the grammar-constrained output is the call's arguments object itself, so each delta is
    an argument fragment: ``CallDelta(0, name, first_delta)``, then ``CallDelta(0, None, delta)``. ``finish()``
    emits the name (with empty arguments) if nothing was fed. ``call`` is the call so far."""

    def __init__(self, name: str):
        self.name = name
        self._arguments: list[str] = []
        self._started = False

    @property
    def call(self) -> ToolCall:
        return ToolCall(self.name, "".join(self._arguments))

    def feed(self, delta: str) -> list[CallDelta]:
        if self._started and not delta:
            return []
        self._arguments.append(delta)
        first, self._started = not self._started, True
        return [CallDelta(0, self.name if first else None, delta)]

    def finish(self) -> list[CallDelta]:
        return [] if self._started else self.feed("")
