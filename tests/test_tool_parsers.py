"""kvserve.server.tool_parsers: tool calls in hermes / llama3_json / mistral output, whole and streamed; template
detection; the forced-call schema and stream. Pure Python, no model, fast."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from kvserve.server.tool_parsers import (
    PARSERS,
    CallDelta,
    ContentDelta,
    ForcedCallsStream,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedCallStream,
    ParsedOutput,
    ToolCall,
    detect_parser,
    named_schema,
    parse_forced_calls,
    required_schema,
)


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


# ------------------------------------------------------------------------------------------------------------------
# Example outputs: (text, expected content, expected calls), per format

WEATHER = call("get_weather", city="Paris", unit="celsius")
TIME = call("get_time", timezone="Europe/Paris")
NESTED = ToolCall("search", '{"query":{"text":"kv cache","filters":{"year":[2023,2024],"open":true}},"limit":5}')

HERMES_EXAMPLES = [
    # single call, as Qwen2.5 writes it
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [WEATHER]),
    # content before, two calls
    ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
     "Let me check both.", [WEATHER, TIME]),
    # nested arguments, no whitespace around the JSON
    ('<tool_call>{"name": "search", "arguments": {"query": {"text": "kv cache", "filters": {"year": [2023, 2024], '
     '"open": true}}, "limit": 5}}</tool_call>', None, [NESTED]),
    # unicode and braces / quotes / escapes inside strings
    ('Voilà :\n<tool_call>\n{"name": "translate", "arguments": {"text": "日本語 {x} \\"q\\" </tool_call", '
     '"emoji": "🙂"}}\n</tool_call>',
     "Voilà :", [call("translate", text='日本語 {x} "q" </tool_call', emoji="🙂")]),
    # no call at all: the full text, untouched (markers and trailing whitespace included)
    ("The weather in Paris is sunny. Use <b>tags</b> and a < sign.\n\n", "The weather in Paris is sunny. Use <b>tags"
     "</b> and a < sign.\n\n", []),
    ("", "", []),
    ("  \n", "  \n", []),
    # malformed JSON: the block stays in the content, verbatim
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>', []),
    # one bad block among good ones: the bad one is content, the good ones calls
    ('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": get_weather}\n</tool_call>\nDone.',
     '<tool_call>\n{"name": get_weather}\n</tool_call>\nDone.', [TIME]),
    # text between and after calls: each run trimmed where it touches a call, runs joined with a newline
    ('A\n<tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}</tool_call>\n B \n'
     '<tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}</tool_call>  C  ',
     "A\nB\nC  ", [TIME, TIME]),
    # an unclosed last block (max_tokens) counts when its JSON is complete ...
    ('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n', None, [TIME]),
    # ... and is content when it is not
    ('Sure <tool_call>\n{"name": "get_time", "argu', 'Sure <tool_call>\n{"name": "get_time", "argu', []),
    # arguments as a JSON string, "parameters" instead of "arguments", no arguments at all, null arguments
    ('<tool_call>{"name": "get_time", "arguments": "{\\"timezone\\": \\"Europe/Paris\\"}"}</tool_call>', None, [TIME]),
    ('<tool_call>{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}</tool_call>', None, [TIME]),
    ('<tool_call>{"name": "now"}</tool_call><tool_call>{"name": "now", "arguments": null}</tool_call>',
     None, [ToolCall("now", "{}"), ToolCall("now", "{}")]),
    # not calls: no name, arguments not an object, NaN, a JSON array
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     []),
    ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ('x <tool_call>[{"name": "f"}]</tool_call>', 'x <tool_call>[{"name": "f"}]</tool_call>', []),
    # Qwen3 thinking stays content (reasoning is not this module's job)
    ('<think>\nThe user wants the time.\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": '
     '{"timezone": "Europe/Paris"}}\n</tool_call>', "<think>\nThe user wants the time.\n</think>", [TIME]),
    # a marker-like prefix that never becomes one, at the very end
    ("See <tool_c", "See <tool_c", []),
    ("<tool_call", "<tool_call", []),
]

LLAMA_EXAMPLES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER]),
    ('\n  {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n', None, [WEATHER]),
    # several calls separated by ";"
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None, [WEATHER, TIME]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}};{"name": "search", "parameters": '
     '{"query": {"text": "kv cache", "filters": {"year": [2023, 2024], "open": true}}, "limit": 5}};', None,
     [TIME, NESTED]),
    # unicode, braces and escaped quotes in strings
    ('{"name": "translate", "parameters": {"text": "日本語 {x} \\"q\\" }", "emoji": "🙂"}}', None,
     [call("translate", text='日本語 {x} "q" }', emoji="🙂")]),
    # one escaped quote then a closing brace inside a string (a scanner without escapes would stop there)
    ('{"name": "say", "parameters": {"text": "a \\" } b"}}', None, [call("say", text='a " } b')]),
    # prose, even with a JSON object inside it, is content
    ('The call would be {"name": "get_weather", "parameters": {}}', 'The call would be {"name": "get_weather", '
     '"parameters": {}}', []),
    ("Hello! How can I help?", "Hello! How can I help?", []),
    ("", "", []),
    # a JSON answer that is not a call is content, untouched
    (' {"answer": 42}\n', ' {"answer": 42}\n', []),
    # malformed / truncated JSON
    ('{"name": "get_weather", "parameters": {"city": "Paris"', '{"name": "get_weather", "parameters": {"city": "Paris"',
     []),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": Paris}}',
     '<|python_tag|>{"name": "get_weather", "parameters": {"city": Paris}}', []),
    # a good call then garbage: the garbage is content
    ('{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}; {"name": oops}',
     '{"name": oops}', [TIME]),
    ('{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}\n\nI called the tool.',
     "I called the tool.", [TIME]),
    # a built-in tool's python call is not JSON: content
    ('<|python_tag|>brave_search.call(query="kv cache")', '<|python_tag|>brave_search.call(query="kv cache")', []),
    ("<|python_tag|>", "<|python_tag|>", []),
    ("<|python_t", "<|python_t", []),
]

MISTRAL_EXAMPLES = [
    # older templates: a JSON array
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None, [WEATHER]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "a1b2c3d4e"}, '
     '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', None, [WEATHER, TIME]),
    # v11+: name[ARGS]{...}, several segments, content before
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', None, [WEATHER]),
    ('I will look both up.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
     '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}', "I will look both up.", [WEATHER, TIME]),
    ('[TOOL_CALLS]search[ARGS]{"query": {"text": "kv cache", "filters": {"year": [2023, 2024], "open": true}}, '
     '"limit": 5}', None, [NESTED]),
    # [CALL_ID], and [ARGS] missing
    ('[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"timezone": "Europe/Paris"}', None, [TIME]),
    ('[TOOL_CALLS]get_time{"timezone": "Europe/Paris"}', None, [TIME]),
    # unicode, brackets and quotes in strings
    ('[TOOL_CALLS]translate[ARGS]{"text": "日本語 [TOOL_CALLS] {x} \\"q\\"", "emoji": "🙂"}', None,
     [call("translate", text='日本語 [TOOL_CALLS] {x} "q"', emoji="🙂")]),
    ('[TOOL_CALLS] [{"name": "translate", "arguments": {"text": "a]b}c\\\\", "emoji": "🙂"}}]', None,
     [call("translate", text="a]b}c\\", emoji="🙂")]),
    ('[TOOL_CALLS]say[ARGS]{"text": "a \\" } b"}', None, [call("say", text='a " } b')]),
    ('[TOOL_CALLS][{"name": "say", "arguments": {"text": "a \\" ] b"}}]', None, [call("say", text='a " ] b')]),
    # no call
    ("Paris is the capital of France [1].", "Paris is the capital of France [1].", []),
    ("", "", []),
    ("[TOOL_CALL", "[TOOL_CALL", []),
    # malformed: the segment stays content, and the search goes on after its [TOOL_CALLS]
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}', '[TOOL_CALLS] [{"name": "get_weather", '
     '"arguments": {"city": "Paris"}', []),
    ("[TOOL_CALLS]", "[TOOL_CALLS]", []),
    ("[TOOL_CALLS] I cannot call tools.", "[TOOL_CALLS] I cannot call tools.", []),
    ('[TOOL_CALLS]get time[ARGS]{}', '[TOOL_CALLS]get time[ARGS]{}', []),
    ('[TOOL_CALLS]get_time[ARGS]"Paris"', '[TOOL_CALLS]get_time[ARGS]"Paris"', []),
    ('[TOOL_CALLS][]', '[TOOL_CALLS][]', []),
    ('[TOOL_CALLS]bad[ARGS]{"a": }[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}',
     '[TOOL_CALLS]bad[ARGS]{"a": }', [TIME]),
    ('[TOOL_CALLS][{"name": "f"[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}',
     '[TOOL_CALLS][{"name": "f"', [TIME]),
    ('[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}\nDone.', "Done.", [TIME]),
]

ALL_EXAMPLES = [("hermes", *e) for e in HERMES_EXAMPLES] + [("llama3_json", *e) for e in LLAMA_EXAMPLES] + \
    [("mistral", *e) for e in MISTRAL_EXAMPLES]
IDS = [f"{name}-{i}" for name, examples in (("hermes", HERMES_EXAMPLES), ("llama3_json", LLAMA_EXAMPLES),
                                             ("mistral", MISTRAL_EXAMPLES)) for i in range(len(examples))]


def test_registry():
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral"}
    assert PARSERS["hermes"] is HermesParser and PARSERS["llama3_json"] is Llama3JsonParser
    assert PARSERS["mistral"] is MistralParser
    assert all(cls.name == name for name, cls in PARSERS.items())
    assert MistralParser.needs_special_tokens and not HermesParser.needs_special_tokens


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), ALL_EXAMPLES, ids=IDS)
def test_parse(fmt, text, content, calls):
    parsed = PARSERS[fmt]().parse(text)
    assert parsed == ParsedOutput(content, calls)
    for c in parsed.calls:
        assert isinstance(json.loads(c.arguments), dict)


# ------------------------------------------------------------------------------------------------------------------
# Streaming: the concatenated events equal parse() for every way of cutting the text


def run_stream(fmt: str, chunks: list[str]) -> ParsedOutput:
    """Feeds the chunks, checks the event protocol, and folds the events into a ParsedOutput."""
    stream = PARSERS[fmt]().stream()
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    assert stream.finish() == []
    content: list[str] = []
    names: list[str] = []
    arguments: list[str] = []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content.append(event.text)
        else:
            assert isinstance(event, CallDelta)
            if event.index == len(names):  # a new call: its first delta names it
                assert event.name
                names.append(event.name)
                arguments.append(event.arguments)
            else:
                assert event.index == len(names) - 1 and event.name is None
                arguments[-1] += event.arguments
    return ParsedOutput("".join(content) or None, [ToolCall(n, a) for n, a in zip(names, arguments)])


def splits(text: str, seed: int) -> list[list[str]]:
    """Single characters, every cut in two, fixed-size chunks, and random cuts."""
    ways = [list(text), [text]]
    ways += [[text[:i], text[i:]] for i in range(1, len(text))]
    ways += [[text[i:i + n] for i in range(0, len(text), n)] for n in (2, 3, 5, 7, 11)]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        ways.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return ways


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), ALL_EXAMPLES, ids=IDS)
def test_stream_equals_parse(fmt, text, content, calls):
    expected = ParsedOutput(content or None, calls)  # a stream cannot tell "" from None: no content deltas
    for i, chunks in enumerate(splits(text, seed=len(text))):
        assert run_stream(fmt, chunks) == expected, (i, chunks)


def test_stream_random_texts_equal_parse():
    """Random mixes of markers, JSON pieces, whitespace and prose: stream and parse agree on every cut."""
    pieces = {
        "hermes": ["<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": 1}}', '{"name": "g"}', "\n", " ",
                   "text", "<", "<tool_c", "{", "}", '"', "ok."],
        "llama3_json": ["<|python_tag|>", '{"name": "f", "parameters": {"a": "}"}}', ";", " ", "\n", "{", "}", "x",
                        '"', '{"name": "g"}', "<|py"],
        "mistral": ["[TOOL_CALLS]", "f[ARGS]", "g", "[ARGS]", "[CALL_ID]", "abc", '{"a": [1]}', "[", "]", " ", "\n",
                    '[{"name": "f", "arguments": {}}]', "{", "}", "text", "[TOOL_C"],
    }
    rng = random.Random(1234)
    for fmt, choices in pieces.items():
        parser = PARSERS[fmt]()
        for _ in range(150):
            text = "".join(rng.choice(choices) for _ in range(rng.randint(0, 8)))
            parsed = parser.parse(text)
            expected = ParsedOutput(parsed.content or None, parsed.calls)
            for chunks in (list(text), [text], *splits(text, seed=rng.random())[-5:]):
                assert run_stream(fmt, chunks) == expected, (fmt, text, chunks)


def test_stream_holds_back_a_partial_marker():
    stream = HermesParser().stream()
    assert stream.feed("Hello <tool_c") == [ContentDelta("Hello")]  # the space may end the content: held too
    assert stream.feed("all>\n") == []
    assert stream.feed('{"name": "f", "arguments": {"x": 1}}\n') == []
    assert stream.feed("</tool_call>") == [CallDelta(0, "f", '{"x":1}')]
    assert stream.finish() == []

    stream = HermesParser().stream()
    assert stream.feed("Hello <tool_c") == [ContentDelta("Hello")]
    assert stream.feed("ould") == [ContentDelta(" <tool_could")]  # not a marker after all
    assert stream.feed(" <") == []
    assert stream.finish() == [ContentDelta(" <")]

    stream = MistralParser().stream()
    assert stream.feed("See [1") == [ContentDelta("See [1")]
    assert stream.feed("] and [TOOL_") == [ContentDelta("] and")]
    assert stream.feed("CALLS]get_time[ARGS]") == []
    assert stream.feed('{"timezone": "UTC"}') == [CallDelta(0, "get_time", '{"timezone":"UTC"}')]

    stream = Llama3JsonParser().stream()
    assert stream.feed(" <|python") == []
    assert stream.feed("_tag|>{") == []
    assert stream.feed('"name": "f", "parameters": {}}') == [CallDelta(0, "f", "{}")]
    assert stream.finish() == []

    stream = Llama3JsonParser().stream()
    assert stream.feed(" <|pyx") == [ContentDelta(" <|pyx")]  # decided at once: content from here on
    assert stream.feed(' {"name": "f", "parameters": {}}') == [ContentDelta(' {"name": "f", "parameters": {}}')]


def test_stream_emits_calls_as_they_complete():
    stream = HermesParser().stream()
    events = stream.feed('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", ')
    assert events == [CallDelta(0, "a", "{}")]
    assert stream.feed('"arguments": {}}</tool_call>') == [CallDelta(1, "b", "{}")]
    assert stream.finish() == []

    stream = Llama3JsonParser().stream()
    assert stream.feed('{"name": "a", "parameters": {}}; {"name": "b"') == [CallDelta(0, "a", "{}")]
    assert stream.feed("}") == [CallDelta(1, "b", "{}")]


def test_stream_rejects_feed_after_finish():
    stream = HermesParser().stream()
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed("x")


def test_parsers_never_raise_on_junk():
    rng = random.Random(7)
    alphabet = '{}[]":;,\\ \n<>|/_abcTOLCAShnmrgupyt' + "é🙂"
    for parser in (cls() for cls in PARSERS.values()):
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            parser.parse(text)
            run_stream(parser.name, list(text))
    deep = "[" * 100_000  # deeper than the JSON decoder's recursion allows
    assert HermesParser().parse(f"<tool_call>{{\"name\": \"f\", \"arguments\": {deep}</tool_call>").calls == []
    assert MistralParser().parse(f"[TOOL_CALLS]{deep}{']' * 100_000}").calls == []


# ------------------------------------------------------------------------------------------------------------------
# detect_parser on template snippets

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are \
provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" and message.tool_calls %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}"""

QWEN3_CODER_TEMPLATE = """{%- for tool_call in message.tool_calls %}
    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
    {%- for args_name, args_value in tool_call.arguments|items %}
        {{- '<parameter=' + args_name + '>\\n' }}{{- args_value }}{{- '\\n</parameter>\\n' }}
    {%- endfor %}
    {{- '</function>\\n</tool_call>' }}
{%- endfor %}"""

GLM45_TEMPLATE = """{%- for tc in m.tool_calls %}
{{- '<tool_call>' + tc.name }}
{%- for k, v in tc.arguments.items() %}
{{ '<arg_key>' + k + '</arg_key>' }}
{{ '<arg_value>' + v | tojson + '</arg_value>' }}
{%- endfor %}
</tool_call>{%- endfor %}"""

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{%- if tools_in_user_message and not tools is none %}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
        {%- else %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}"""

# Llama 3.2 style without <|python_tag|> (no built-in tools)
LLAMA32_TEMPLATE = """{{- "<|start_header_id|>user<|end_header_id|>\\n\\n" -}}
{{- "Given the following functions, please respond with a JSON for a function call " }}
{{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{{- first_user_message + "<|eot_id|>"}}"""

LLAMA3_PLAIN_TEMPLATE = """{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + \
'<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}\
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""

MISTRAL_V3_TEMPLATE = """{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- '{"type": "function", "function": {' }}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {{- '{"name": "' + tool_call.function.name + '", "arguments": ' + tool_call.function.arguments|tojson }}
            {{- ', "id": "' + tool_call.id + '"}' }}
        {%- endfor %}
        {{- "]" + eos_token }}
    {%- endif %}
{%- endfor %}"""

MISTRAL_SMALL_32_TEMPLATE = """{%- elif message['role'] == 'assistant' %}
    {%- if message['tool_calls'] is defined and message['tool_calls'] is not none %}
        {%- for tool in message['tool_calls'] %}
            {%- set arguments = tool['function']['arguments'] %}
            {%- if arguments is not string %}{%- set arguments = arguments|tojson %}{%- endif %}
            {{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}
        {%- endfor %}
    {%- endif %}
    {{- eos_token }}"""

CHATML_TEMPLATE = """{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + \
'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""


@pytest.mark.parametrize(("template", "expected"), [
    (QWEN25_TEMPLATE, "hermes"),
    (QWEN3_CODER_TEMPLATE, None),
    (GLM45_TEMPLATE, None),
    (LLAMA31_TEMPLATE, "llama3_json"),
    (LLAMA32_TEMPLATE, "llama3_json"),
    (LLAMA3_PLAIN_TEMPLATE, None),
    (MISTRAL_V3_TEMPLATE, "mistral"),
    (MISTRAL_SMALL_32_TEMPLATE, "mistral"),
    (CHATML_TEMPLATE, None),
    ("", None),
    (None, None),
], ids=["qwen2.5", "qwen3-coder", "glm-4.5", "llama3.1", "llama3.2", "llama3-no-tools", "mistral-v3",
        "mistral-small-3.2", "chatml", "empty", "none"])
def test_detect_parser(template, expected):
    assert detect_parser(template) == expected


# ------------------------------------------------------------------------------------------------------------------
# Forced calls: required_schema, ForcedCallsStream, NamedCallStream

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                  "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters":
                                      WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]


def validate(value, schema) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)

def test_required_schema_shape():
    schema = required_schema(TOOLS)
    assert schema == {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "const": "get_weather"},
                                          "parameters": WEATHER_PARAMS},
         "required": ["name", "parameters"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"type": "string", "const": "now"},
                                          "parameters": {"type": "object"}},
         "required": ["name", "parameters"], "additionalProperties": False},
    ]}}
    assert list(schema["items"]["anyOf"][0]["properties"]) == ["name", "parameters"]  # the order the grammar keeps
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] is not WEATHER_PARAMS  # a copy
    json.dumps(schema)

    good = [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, {"name": "now",
                                                                                          "parameters": {}}]
    assert validate(good, schema)
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "now"}],
                [{"name": "now", "parameters": {}, "extra": 1}], [{"name": "get_weather", "parameters": {}}],
                {"name": "now", "parameters": {}}):
        assert not validate(bad, schema), bad


def test_required_schema_rejects_bad_tools():
    for tools in ([], [{"type": "function", "function": {}}], [{"type": "retrieval"}], ["get_weather"]):
        with pytest.raises(ValueError):
            required_schema(tools)
    assert named_schema(TOOLS, "get_weather") == WEATHER_PARAMS
    assert named_schema(TOOLS, "now") == {"type": "object"}
    with pytest.raises(ValueError):
        named_schema(TOOLS, "nope")


FORCED_EXAMPLES = [
    # the compact layout the grammar produces
    ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, {"name": "now", "parameters": {}}]',
     [ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}'), ToolCall("now", "{}")]),
    # strings with braces, brackets, quotes, escaped quotes and backslashes; unicode; nesting
    ('[{"name": "note", "parameters": {"text": "a } b { \\"c\\" ]\\\\", "tags": [{"k": "}"}], "n": {"m": {}}}}]',
     [ToolCall("note", '{"text": "a } b { \\"c\\" ]\\\\", "tags": [{"k": "}"}], "n": {"m": {}}}')]),
    ('[{"name": "tr\\u00e9s", "parameters": {"t": "日本語🙂"}}]', [ToolCall("trés", '{"t": "日本語🙂"}')]),
    # free whitespace (a grammar that allows it): arguments verbatim
    ('\n[\n  {\n    "name" : "now" ,\n    "parameters" : { "tz" : "UTC" }\n  }\n]\n',
     [ToolCall("now", '{ "tz" : "UTC" }')]),
]


def run_forced(chunks: list[str]) -> tuple[list[ToolCall], ForcedCallsStream]:
    stream = ForcedCallsStream()
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    names: list[str] = []
    arguments: list[str] = []
    for event in events:
        if event.index == len(names):
            assert event.name
            names.append(event.name)
            arguments.append(event.arguments)
        else:
            assert event.index == len(names) - 1 and event.name is None and event.arguments
            arguments[-1] += event.arguments
    return [ToolCall(n, a) for n, a in zip(names, arguments)], stream


@pytest.mark.parametrize(("text", "calls"), FORCED_EXAMPLES)
def test_forced_calls_stream(text, calls):
    assert parse_forced_calls(text) == calls
    for chunks in splits(text, seed=3):
        got, stream = run_forced(chunks)
        assert got == calls, chunks
        assert stream.calls == calls and stream.closed


def test_forced_calls_stream_emits_name_first_then_fragments():
    stream = ForcedCallsStream()
    assert stream.feed('[{"name": "get_wea') == []
    assert stream.feed('ther"') == [CallDelta(0, "get_weather", "")]
    assert stream.feed(', "parameters": {"ci') == [CallDelta(0, None, '{"ci')]
    assert stream.feed('ty": "Pa}"}') == [CallDelta(0, None, 'ty": "Pa}"}')]
    assert stream.feed('}, {"name": "now", "parameters": {}') == [CallDelta(1, "now", ""), CallDelta(1, None, "{}")]
    assert not stream.closed
    assert stream.feed("}]") == []
    assert stream.closed and stream.finish() == []
    assert stream.calls == [ToolCall("get_weather", '{"city": "Pa}"}'), ToolCall("now", "{}")]


def test_forced_calls_stream_truncated_and_out_of_order():
    stream = ForcedCallsStream()
    stream.feed('[{"name": "get_weather", "parameters": {"city": "Pa')
    assert stream.calls == [ToolCall("get_weather", '{"city": "Pa')] and not stream.closed
    # parameters before name (a grammar would not allow it): held, then sent with the name
    got, _ = run_forced(list('[{"parameters": {"a": 1}, "name": "f"}]'))
    assert got == [ToolCall("f", '{"a": 1}')]


def test_named_call_stream():
    stream = NamedCallStream("get_weather")
    assert stream.feed('{"city": ') == [CallDelta(0, "get_weather", '{"city": ')]
    assert stream.feed("") == []
    assert stream.feed('"Paris"}') == [CallDelta(0, None, '"Paris"}')]
    assert stream.finish() == []
    assert stream.call == ToolCall("get_weather", '{"city": "Paris"}')
    assert NamedCallStream("now").finish() == [CallDelta(0, "now", "")]
