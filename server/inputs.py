"""From either API's body to what the engine takes, on one path for both: the model name, the fields
each API supports (with the bounds it documents), prompt token ids (tokenized or rendered on a worker
thread, bounded in time) and SamplingParams. Every refusal is an APIError naming the field as the
client spelled it (`temperature` for OpenAI, `parameters.temperature` for TGI)."""
from __future__ import annotations

import asyncio
import ctypes
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from kvserve import SamplingParams, StructuredOutput, check_structured
from kvserve.server.errors import APIError
from kvserve.server.grammars import response_format_spec, tgi_grammar_spec
from kvserve.server.tools import ToolPlan, plan_tools, template_message
from kvserve.server.schemas_openai import (MAX_LOGIT_BIAS, MAX_PROMPTS, MAX_SEQUENCES, ChatCompletionRequest,
                                           CompletionRequest, SamplingFields, TokenizeChatRequest)
from kvserve.server.schemas_tgi import DEFAULT_MAX_NEW_TOKENS, GenerateParameters, GenerateRequest
from kvserve.server.serving import ServerState
from kvserve.server.validation import (check_json_value, random_seed, reject_unknown, reject_unsupported,
                                       resolve_max_tokens)

# what huggingface_hub's InferenceClient(base_url=...) sends as the chat model: "dummy" since 0.28,
# "tgi" before (TGI's own examples too); TGI accepts any name, kvserve only these and its own
PLACEHOLDER_MODEL_NAMES = ("dummy", "tgi")
CPU_WORK_TIMEOUT_S = 10.0
CPU_WORKERS = 4
MAX_TEMPLATE_KWARGS_CHARS = 64 * 1024
# apply_chat_template's own arguments: chat_template_kwargs must not override them
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"})
PARAM_FIELDS = frozenset(SamplingParams.__dataclass_fields__)
LEADING_FIELD = re.compile(r"^([a-z_]+)")
TOKEN_ID = re.compile(r"[0-9]{1,10}")

Rename = Callable[[str], str]


@dataclass
class Prepared:
    """A request ready for admit_group(): prompt ids and checked params (and the seed TGI reports)."""
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None = None
    tools: ToolPlan | None = None      # chat: what the reply does with the request's tools


# the model name

def check_model(state: ServerState, model: str | None) -> None:
    """Any served name, the model path or id, or huggingface_hub's placeholder; else OpenAI's 404."""
    if model is None:
        return
    names = {*state.settings.served_model_names, state.served_model_name, *PLACEHOLDER_MODEL_NAMES}
    if state.engine is not None:
        names.add(str(state.engine.model_id))
    if model not in names:
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise APIError("not_found", f"the model `{shown}` does not exist; this server serves "
                       f"`{state.served_model_name}`", param="model", code="model_not_found")


# CPU work off the event loop

class WorkTimeout(Exception):
    """Raised inside a worker thread to stop work that ran past its time bound."""


def _raise_in_thread(thread_id: int, exc: type[BaseException] | None) -> None:
    """Schedule `exc` in a thread (raised at its next bytecode boundary); None clears a pending one."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class _Job:
    """A call on a worker thread that the event loop can stop: dropped if not started yet, else
    interrupted with WorkTimeout (a Jinja loop is Python code, so it stops at its next bytecode)."""

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self.fn, self.args = fn, args
        self.lock = threading.Lock()
        self.thread_id: int | None = None
        self.stopped = False

    def __call__(self) -> Any:
        with self.lock:
            if self.stopped:
                raise WorkTimeout
            self.thread_id = threading.get_ident()
        try:
            return self.fn(*self.args)
        finally:
            with self.lock:
                if self.stopped:   # a WorkTimeout not delivered yet must not fire in the pool's own code
                    _raise_in_thread(self.thread_id, None)
                self.thread_id = None

    def stop(self) -> bool:
        """Stop the job; True if it was running (it is then interrupted)."""
        with self.lock:
            self.stopped = True
            if self.thread_id is None:
                return False
            _raise_in_thread(self.thread_id, WorkTimeout)
            return True


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="kvserve-prompt")
    return _pool


async def off_loop(what: str, param: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a worker thread within CPU_WORK_TIMEOUT_S: past it the work is stopped and the
    request refused (4xx if it ran that long, 503 if it never got a worker)."""
    job = _Job(fn, args)
    future = asyncio.get_running_loop().run_in_executor(_executor(), job)
    future.add_done_callback(lambda done: done.cancelled() or done.exception())   # retrieved, never logged
    try:
        return await asyncio.wait_for(asyncio.shield(future), CPU_WORK_TIMEOUT_S)
    except asyncio.TimeoutError:   # the builtin TimeoutError only from Python 3.11 on
        if job.stop():
            raise APIError("validation", f"{what} took longer than {CPU_WORK_TIMEOUT_S:g} s and was stopped",
                           param=param, code="timeout") from None
        raise APIError("unavailable", f"the server is busy: {what} did not start within "
                       f"{CPU_WORK_TIMEOUT_S:g} s; retry later", code="busy") from None
    except asyncio.CancelledError:
        job.stop()
        raise


_longest_token: dict[int, int] = {}


def check_chars(tokenizer: Any, text: str, max_model_len: int | None, param: str) -> None:
    """Refuse, before tokenizing it, a text too long for max_model_len tokens of the vocabulary's longest
    token (4x margin for normalizers): megabytes of text would hold a core for seconds."""
    if max_model_len is None:
        return
    if id(tokenizer) not in _longest_token:
        _longest_token[id(tokenizer)] = max((len(token) for token in tokenizer.get_vocab()), default=1)
    limit = 4 * max_model_len * max(_longest_token[id(tokenizer)], 1)
    if len(text) > limit:
        raise APIError("validation", f"{param} has {len(text)} characters, more than {max_model_len} tokens "
                       f"(max_model_len) of this model can hold", param=param, code="context_length_exceeded")


def encode(tokenizer: Any, text: str, max_model_len: int | None, param: str,
           add_special_tokens: bool = True) -> list[int]:
    """engine.encode's tokenization without transformers' too-long warning (the engine checks lengths)."""
    check_chars(tokenizer, text, max_model_len, param)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False)


def encode_spans(tokenizer: Any, text: str, max_model_len: int | None,
                 param: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """encode()'s token ids with each token's character span in `text`: a fast tokenizer's offset
    mapping, None from a tokenizer without one."""
    if not getattr(tokenizer, "is_fast", False):
        return encode(tokenizer, text, max_model_len, param), None
    check_chars(tokenizer, text, max_model_len, param)
    encoding = tokenizer(text, return_offsets_mapping=True, verbose=False)
    return list(encoding["input_ids"]), [(int(start), int(stop)) for start, stop in encoding["offset_mapping"]]


async def tokenize(state: ServerState, text: str, param: str, bounded: bool = True,
                   add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; `bounded`: refuse texts that cannot fit (not when TGI truncates them)."""
    engine = state.require_engine()
    max_model_len = engine.max_model_len if bounded else None
    return await off_loop(f"tokenizing {param}", param, encode, engine.tokenizer, text, max_model_len, param,
                          add_special_tokens)


# errors of SamplingParams and engine.validate, in the API's names

def refusal(message: str, rename: Rename, param: str | None = None) -> APIError:
    """A ValueError from SamplingParams or engine.validate as a validation APIError; each "; "-separated
    part that starts with a SamplingParams field is renamed to the API's field."""
    parts, first = [], None
    for part in message.split("; "):
        match = LEADING_FIELD.match(part)
        if match and match.group(1) in PARAM_FIELDS:
            first = first or rename(match.group(1))
            part = rename(match.group(1)) + part[match.end():]
        parts.append(part)
    return APIError("validation", "; ".join(parts), param=param or first)


def build_params(rename: Rename, **fields: Any) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise refusal(str(exc), rename) from exc


def engine_validate(state: ServerState, prompt_ids: list[int], params: SamplingParams, rename: Rename,
                    prompt_param: str) -> None:
    """engine.validate (vocabulary, lengths) before admit_group(), so its refusals name the API's fields."""
    try:
        state.require_engine().validate(prompt_ids, params)
    except ValueError as exc:
        param = getattr(exc, "param", None)
        raise refusal(str(exc), rename, prompt_param if param == "prompt" else rename(param) if param
                      else None) from exc


# OpenAI

def check_openai(state: ServerState, body: SamplingFields) -> None:
    """What both OpenAI routes refuse: unknown fields, a wrong model, n != 1, stream_options without stream."""
    reject_unknown(body)
    check_model(state, body.model)
    if body.stream_options is not None:
        if not body.stream:
            raise APIError("validation", "stream_options is only allowed when stream is true",
                           param="stream_options")
        reject_unknown(body.stream_options, prefix="stream_options.")


def check_chat(body: ChatCompletionRequest) -> None:
    """Chat fields that would change the output if they were ignored."""
    reject_unsupported([
        ("functions", body.functions, bool(body.functions)),
        ("function_call", body.function_call, body.function_call not in (None, "none")),
        ("modalities", body.modalities, body.modalities not in (None, ["text"])),
        ("audio", body.audio, body.audio is not None),
        ("prediction", body.prediction, body.prediction is not None),
        ("reasoning_effort", body.reasoning_effort, body.reasoning_effort is not None),
        ("verbosity", body.verbosity, body.verbosity is not None),
        ("web_search_options", body.web_search_options, body.web_search_options is not None),
    ])
    if body.top_logprobs and not body.logprobs:
        raise APIError("validation", "top_logprobs needs logprobs to be true", param="top_logprobs")


def check_completion(body: CompletionRequest) -> None:
    reject_unsupported([("suffix", body.suffix, body.suffix is not None)])
    n = body.n or 1
    if body.best_of is not None and body.best_of < n:
        raise APIError("validation", f"best_of must be at least n ({n}), got {body.best_of}", param="best_of")
    if body.stream and body.best_of not in (None, n):
        raise APIError("validation", "best_of must equal n when streaming (the best are known only at the end)",
                       param="best_of")


def choices_per_prompt(body: SamplingFields) -> tuple[int, int]:
    """(n, outputs generated per prompt): best_of for completions that ask for it."""
    n = body.n or 1
    return n, max(n, getattr(body, "best_of", None) or n)


def member_params(params: SamplingParams, j: int) -> SamplingParams:
    """The params of a prompt's output j: output 0's own; a seeded request gives each output its own seed
    (reproducible, different draws)."""
    if j == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + j * 0x9E3779B97F4A7C15) % 2**64)


def logit_bias(bias: dict[str, float] | None, param: str = "logit_bias") -> dict[int, float]:
    """OpenAI's {"token id": bias} with string keys, as SamplingParams' {id: bias}. The count is checked
    first: a body of hundreds of thousands of keys is refused before any is looked at."""
    if bias and len(bias) > MAX_LOGIT_BIAS:
        raise APIError("validation", f"{param} has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                       param=param)
    result = {}
    for key, value in (bias or {}).items():
        if not TOKEN_ID.fullmatch(key):
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise APIError("validation", f"{param} keys must be token ids (non-negative integers written as "
                           f"strings), got {shown!r}", param=param)
        result[int(key)] = value
    return result


async def check_grammar(spec: StructuredOutput | None, param: str) -> StructuredOutput | None:
    """Compile-check a structured output's grammar on a worker thread (cached by spec): a grammar the
    engine cannot compile is the client's 400, never the engine's failure."""
    if spec is not None:
        error = await off_loop("compiling the grammar", param, check_structured, spec)
        if error:
            raise APIError("validation", f"{param} cannot be compiled: {error}", param=param)
    return spec


def openai_params(body: SamplingFields, max_tokens: int, rename: Rename, top_logprobs: int = 0,
                  prompt_logprobs: int | None = None, structured: StructuredOutput | None = None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return build_params(
        rename, max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, seed=body.seed, stop=stop,
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
        skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
        logit_bias=logit_bias(body.logit_bias), top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
        structured=structured)


async def completion_prompts(state: ServerState, prompt: Any, outputs_per_prompt: int) -> list[list[int]]:
    """Token ids of each completion prompt: a string, token ids, or a list of those (at most MAX_PROMPTS,
    and MAX_SEQUENCES outputs in all)."""
    prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise APIError("validation", f"prompt has {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed",
                       param="prompt")
    if len(prompts) * outputs_per_prompt > MAX_SEQUENCES:
        raise APIError("validation", f"{len(prompts)} prompts x {outputs_per_prompt} outputs each is "
                       f"{len(prompts) * outputs_per_prompt} sequences; at most {MAX_SEQUENCES} are allowed",
                       param="n")
    result = []
    for i, one in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        ids = await tokenize(state, one, param) if isinstance(one, str) else list(one)
        if not ids:
            raise APIError("validation", f"{param} must not be empty", param=param)
        result.append(ids)
    return result


async def prepare_completion(state: ServerState, body: CompletionRequest) -> list[Prepared]:
    """One Prepared per prompt."""
    check_openai(state, body)
    check_completion(body)
    engine = state.require_engine()
    prompts = await completion_prompts(state, body.prompt, choices_per_prompt(body)[1])
    structured = await check_grammar(response_format_spec(body.response_format), "response_format")
    prepared = []
    for i, prompt_ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        max_tokens = resolve_max_tokens(len(prompt_ids), engine.max_model_len, body.max_tokens, None,
                                        "max_tokens", param)
        # echo with logprobs: the prompt's tokens get their logprobs too
        params = openai_params(body, max_tokens, _same, top_logprobs=body.logprobs or 0,
                               prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
                               structured=structured)
        engine_validate(state, prompt_ids, params, _same, param)
        prepared.append(Prepared(prompt_ids, params))
    return prepared


def template_inputs(state: ServerState,
                    body: ChatCompletionRequest | TokenizeChatRequest) -> tuple[str | None, dict[str, Any]]:
    """The request's own chat template (only if the operator trusts them) and the template's extra
    variables (plain JSON values, bounded, none of apply_chat_template's own arguments)."""
    kwargs = dict(body.chat_template_kwargs or {})
    check_json_value(kwargs, "chat_template_kwargs", MAX_TEMPLATE_KWARGS_CHARS)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise APIError("validation", f"chat_template_kwargs.{reserved[0]} is not a template variable; set it "
                       "as a field of the request or leave it out", param=f"chat_template_kwargs.{reserved[0]}")
    template, name = body.chat_template, "chat_template"
    if "chat_template" in kwargs:
        template, name = kwargs.pop("chat_template"), "chat_template_kwargs.chat_template"
    if template is not None and not state.settings.trust_request_chat_template:
        raise APIError("validation", f"{name} is refused: this server renders only the model's own chat "
                       "template (its operator can allow request templates with --trust-request-chat-template)",
                       param=name)
    if template is not None and not isinstance(template, str):
        raise APIError("validation", f"{name} must be a string", param=name)
    return template, kwargs


def message_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, template: str | None,
                kwargs: dict[str, Any], max_model_len: int, continue_final_message: bool = False,
                add_special_tokens: bool = False) -> list[int]:
    """Runs on a worker thread: apply_chat_template (transformers' sandboxed Jinja), then tokenize."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             chat_template=template, **kwargs)
    except WorkTimeout:
        raise
    except Exception as exc:  # jinja errors such as "roles must alternate", or a broken request template
        detail = str(exc) if len(str(exc)) <= 500 else str(exc)[:500] + "..."
        raise APIError("validation", f"cannot apply the chat template: {type(exc).__name__}: {detail}",
                       param="messages") from exc
    if not isinstance(text, str):
        raise APIError("validation", "the chat template did not render text", param="messages")
    check_chars(tokenizer, text, max_model_len, "messages")
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


async def chat_prompt(state: ServerState, body: ChatCompletionRequest | TokenizeChatRequest,
                      continue_final_message: bool = False, add_special_tokens: bool = False,
                      tools: list[dict] | None = None) -> list[int]:
    """Render the messages with the chat template on a worker thread, then tokenize (by default without
    extra specials: the template writes them)."""
    engine = state.require_engine()
    tokenizer = engine.tokenizer
    template, kwargs = template_inputs(state, body)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError("validation", "this model has no chat template; use /v1/completions instead",
                       param="messages", code="no_chat_template")
    messages = [template_message({"role": message.role, "content": message_text(message.content),
                                  **({"name": message.name} if message.name else {})},
                                 getattr(message, "tool_calls", None), getattr(message, "tool_call_id", None))
                for message in body.messages]
    if tools:
        kwargs = {**kwargs, "tools": tools}
    return await off_loop("rendering the chat template", "messages", render_chat, tokenizer, messages,
                          body.add_generation_prompt, template, kwargs, engine.max_model_len,
                          continue_final_message, add_special_tokens)


async def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> Prepared:
    check_openai(state, body)
    check_chat(body)
    engine = state.require_engine()
    tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, engine.tokenizer.chat_template,
                       state.settings.tool_call_parser)
    prompt_ids = await chat_prompt(state, body, tools=tools.tools)
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(len(prompt_ids), engine.max_model_len, requested, None, name, "messages")

    def rename(field: str) -> str:
        return name if field == "max_tokens" else field

    structured = response_format_spec(body.response_format)
    if tools.forced:
        if structured is not None:
            raise APIError("validation", f"response_format cannot be combined with tool_choice {tools.mode!r} (the "
                           "reply is the tool calls)", param="response_format")
        structured = await check_grammar(tools.structured, "tools")
    else:
        structured = await check_grammar(structured, "response_format")
    params = openai_params(body, max_tokens, rename, top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
                           structured=structured)
    if tools.parser is not None and tools.parser.needs_special_tokens:
        params.skip_special_tokens = False     # the format's markers are special tokens
    engine_validate(state, prompt_ids, params, rename, "messages")
    return Prepared(prompt_ids, params, tools=tools)


def _same(field: str) -> str:
    return field


# TGI

def tgi_name(field: str) -> str:
    return "parameters.max_new_tokens" if field == "max_tokens" else f"parameters.{field}"


def check_tgi(parameters: GenerateParameters, stream: bool) -> None:
    reject_unknown(parameters, prefix="parameters.")
    reject_unsupported([
        ("parameters.typical_p", parameters.typical_p, parameters.typical_p is not None),
        ("parameters.watermark", parameters.watermark, parameters.watermark),
        ("parameters.adapter_id", parameters.adapter_id, parameters.adapter_id is not None),
    ])
    if (parameters.best_of or 1) > 1:     # TGI's own rules for best_of
        why = ("is not supported when streaming" if stream else "needs sampling (do_sample, temperature, top_k or "
               "top_p)" if not (parameters.do_sample or parameters.temperature not in (None, 1.0)
                                or parameters.top_k is not None or parameters.top_p is not None)
               else "cannot be combined with a seed (each sequence draws its own)" if parameters.seed is not None
               else None)
        if why:
            raise APIError("validation", f"parameters.best_of > 1 {why}", param="parameters.best_of")
    if stream and parameters.decoder_input_details:
        raise APIError("validation", "parameters.decoder_input_details is not supported when streaming",
                       param="parameters.decoder_input_details")


def tgi_params(parameters: GenerateParameters, max_tokens: int,
               structured: StructuredOutput | None = None) -> tuple[SamplingParams, int | None]:
    """TGI semantics: greedy unless do_sample or a sampling knob is set; a seed is drawn if missing."""
    sample = (parameters.do_sample or parameters.temperature not in (None, 1.0) or parameters.top_k is not None
              or parameters.top_p is not None)
    seed = (parameters.seed if parameters.seed is not None else random_seed()) if sample else None
    params = build_params(
        tgi_name, max_tokens=max_tokens, temperature=(parameters.temperature or 1.0) if sample else 0.0,
        top_k=parameters.top_k or 0, top_p=parameters.top_p or 1.0,
        repetition_penalty=parameters.repetition_penalty or 1.0,
        frequency_penalty=parameters.frequency_penalty or 0.0, seed=seed, stop=list(parameters.stop),
        include_stop_str_in_output=True, ignore_eos=parameters.ignore_eos, top_logprobs=parameters.top_n_tokens or 0,
        logit_bias=logit_bias(parameters.logit_bias, "parameters.logit_bias"),
        prompt_logprobs=0 if parameters.details and parameters.decoder_input_details else None,
        structured=structured)
    return params, seed


async def prepare_tgi(state: ServerState, body: GenerateRequest, stream: bool) -> Prepared:
    parameters = body.parameters
    check_tgi(parameters, stream)
    engine = state.require_engine()
    prompt_ids = await tokenize(state, body.inputs, "inputs", bounded=parameters.truncate is None)
    if parameters.truncate is not None:
        prompt_ids = prompt_ids[-parameters.truncate:]
    if not prompt_ids:
        raise APIError("validation", "inputs must not be empty", param="inputs")
    max_tokens = resolve_max_tokens(len(prompt_ids), engine.max_model_len, parameters.max_new_tokens,
                                    DEFAULT_MAX_NEW_TOKENS, "parameters.max_new_tokens", "inputs")
    structured = await check_grammar(tgi_grammar_spec(parameters.grammar), "parameters.grammar")
    params, seed = tgi_params(parameters, max_tokens, structured)
    engine_validate(state, prompt_ids, params, tgi_name, "inputs")
    return Prepared(prompt_ids, params, seed)
