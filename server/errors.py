"""API errors and their two wire shapes: TGI's {"error", "error_type"} and OpenAI's {"error": {...}}."""
from __future__ import annotations

import json
import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve import EngineDeadError, EngineOverloadedError, InvalidRequestError

logger = logging.getLogger("kvserve.server")

Kind = Literal["validation", "unauthorized", "not_found", "too_large", "overloaded", "unavailable", "generation",
               "internal"]
Family = Literal["tgi", "openai"]

TGI_STATUS: dict[str, int] = {"validation": 422, "unauthorized": 401, "not_found": 404, "too_large": 413,
                              "overloaded": 429, "unavailable": 503, "generation": 424, "internal": 500}
OPENAI_STATUS: dict[str, int] = {"validation": 400, "unauthorized": 401, "not_found": 404, "too_large": 413,
                                 "overloaded": 429, "unavailable": 503, "generation": 500, "internal": 500}
OPENAI_TYPE: dict[str, str] = {"validation": "invalid_request_error", "unauthorized": "invalid_request_error",
                               "not_found": "not_found_error", "too_large": "invalid_request_error",
                               "overloaded": "rate_limit_error", "unavailable": "service_unavailable_error",
                               "generation": "server_error", "internal": "server_error"}
TGI_TYPE: dict[str, str] = {"validation": "validation", "unauthorized": "unauthorized", "not_found": "not_found",
                            "too_large": "payload_too_large", "overloaded": "overloaded",
                            "unavailable": "unavailable", "generation": "generation",
                            "internal": "incomplete_generation"}
FAILURE_REASON: dict[str, str | None] = {"validation": "validation", "unauthorized": None, "not_found": "validation",
                                         "too_large": "validation", "overloaded": "overloaded", "unavailable": None,
                                         "generation": "engine_error", "internal": "engine_error"}


class APIError(Exception):
    """An error with a kind; each API family turns the kind into its own status code and body."""

    def __init__(self, kind: Kind, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.recorded = False   # True once counted in metrics (errors of admitted requests are)

    @property
    def failure_reason(self) -> str | None:
        return FAILURE_REASON[self.kind]

    def status(self, family: Family) -> int:
        return (TGI_STATUS if family == "tgi" else OPENAI_STATUS)[self.kind]

    def body(self, family: Family) -> dict:
        if family == "tgi":
            return {"error": self.message, "error_type": TGI_TYPE[self.kind]}
        return {"error": {"message": self.message, "type": OPENAI_TYPE[self.kind], "param": self.param,
                          "code": self.code}}

    def response(self, family: Family) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.kind in ("overloaded", "unavailable") else None
        return JSONResponse(self.body(family), status_code=self.status(family), headers=headers)


def from_engine_error(exc: Exception, prompt_param: str = "prompt") -> APIError:
    """Map an exception raised by the engine (or SamplingParams) to an APIError."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError("overloaded", str(exc) or "too many requests are waiting; retry later",
                        code="too_many_waiting_requests")
    if isinstance(exc, EngineDeadError):
        return APIError("unavailable", f"the engine is not running: {exc}", code="engine_dead")
    if isinstance(exc, InvalidRequestError):
        param = prompt_param if exc.param == "prompt" else exc.param
        return APIError("validation", str(exc), param=param)
    if isinstance(exc, ValueError):
        return APIError("validation", str(exc))
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError("internal", f"internal error: {type(exc).__name__}: {exc}")


FAMILY_KEY = "kvserve.family"
OPENAI_PATHS = frozenset({"/detokenize"})   # vLLM's routes outside /v1


def family_of_path(path: str) -> Family:
    """OpenAI shape under /v1 and on vLLM's /detokenize, TGI shape everywhere else."""
    return "openai" if path.startswith("/v1/") or path in OPENAI_PATHS else "tgi"


def set_family(request: Request, family: Family) -> None:
    """Answer this request, errors included, in `family`'s shape whatever its path (POST /tokenize
    serves both APIs and tells them apart by the body)."""
    request.scope[FAMILY_KEY] = family


def family_of(request: Request) -> Family:
    return request.scope.get(FAMILY_KEY) or family_of_path(request.url.path)


def json_error(error: dict[str, Any], body: Any) -> str:
    """FastAPI's "JSON decode error" with json's own reason, line and column."""
    reason = (error.get("ctx") or {}).get("error", "invalid JSON")
    position = error["loc"][-1] if isinstance(error["loc"][-1], int) else 0
    where = json.JSONDecodeError(reason, body, position) if isinstance(body, str) else None
    at = f" at line {where.lineno} column {where.colno}" if where else f" at character {position}"
    return f"the body is not valid JSON: {reason}{at}"


def is_field_name(part: Any) -> bool:
    """Location parts that name a field or an index, not one member of a union ("str", "list[int]")."""
    return isinstance(part, int) or (part != "body" and part.isidentifier() and part not in UNION_TAGS
                                     and not part[:1].isupper())


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """Turn pydantic's error list into one readable message and the first offending field."""
    parts: dict[str, list[str]] = {}
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return json_error(error, exc.body), None
        field = ".".join(str(part) for part in error.get("loc", ()) if is_field_name(part))
        messages = parts.setdefault(field, [])
        if error.get("msg") not in messages:
            messages.append(str(error.get("msg")))
    described = [f"{field}: {' or '.join(messages)}" if field else " or ".join(messages)
                 for field, messages in list(parts.items())[:5]]
    return "; ".join(described) or "invalid request body", next((field for field in parts if field), None)


def _record(request: Request, error: APIError) -> None:
    state = getattr(request.app.state, "kvserve", None)
    if state is not None and error.failure_reason and not error.recorded:
        state.record_failure(error.failure_reason)


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    _record(request, exc)
    return exc.response(family_of(request))


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, field = describe_validation_error(exc)
    return await handle_api_error(request, APIError("validation", message, param=field))


def unparsable_body(exc: StarletteHTTPException) -> APIError | None:
    """FastAPI's 400 "There was an error parsing the body", with its cause."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return APIError("validation", f"the body is not valid JSON: it is not UTF-8 text ({cause.reason} at "
                        f"byte {cause.start})")
    if isinstance(cause, RecursionError):
        return APIError("validation", "the body is nested too deeply to parse")
    if cause is not None and exc.status_code == 400:
        return APIError("validation", f"the body cannot be parsed: {type(cause).__name__}")
    return None


HTTP_KINDS: dict[int, Kind] = {401: "unauthorized", 404: "not_found", 405: "not_found", 413: "too_large"}


async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    unparsable = unparsable_body(exc)
    if unparsable is not None:
        return await handle_api_error(request, unparsable)
    kind: Kind = HTTP_KINDS.get(exc.status_code, "validation")
    error = APIError(kind, str(exc.detail))
    return JSONResponse(error.body(family_of(request)), status_code=exc.status_code)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return await handle_api_error(request, from_engine_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Register one handler per error class; the route's path picks the wire shape."""
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected)
