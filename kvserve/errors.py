"""Errors the engine raises to its callers; the server maps them to HTTP status codes."""


class KVServeError(Exception):
    """Base class."""


class InvalidRequestError(KVServeError, ValueError):
    """The request is malformed or cannot be served (maps to 4xx)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    def __init__(self, prompt_len: int, max_model_len: int):
        super().__init__(f"the prompt has {prompt_len} tokens, but max_model_len is {max_model_len} "
                         f"tokens (prompt and output together, at least one output token)", param="prompt")
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


class EngineOverloadedError(KVServeError):
    """Too many requests are waiting (maps to 429)."""


class EngineDeadError(KVServeError):
    """The engine loop died; no request can be served (maps to 503 / 500)."""
