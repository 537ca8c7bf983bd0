"""The wire format: OpenAI's request bodies (the fields tandem implements) and its error shape.

Every non-2xx answer is {"error": {"message", "type", "param", "code"}}: `APIError` carries one,
and `install_error_handlers` turns FastAPI's own failures (invalid JSON or fields, unknown routes,
crashes) into the same shape. Parameters tandem cannot honour are refused here with a 400.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tandem.serve")
MAX_STOPS = 16


# -----------------------------------------------------------------------------------------------
# Errors: every non-2xx answer is {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -----------------------------------------------------------------------------------------------
# Request bodies (OpenAI's schema, the fields tandem implements; unknown fields are ignored)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off (vLLM's extension)")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="keep generating past <|im_end|> (vLLM's extension; benchmarks)")
    frequency_penalty: float | None = Field(None, description="not supported: must be 0 or absent")
    presence_penalty: float | None = Field(None, description="not supported: must be 0 or absent")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty or absent")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: must be absent")


def _check_unsupported(body: _Sampling) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by tandem serve; leave it out or set it to 0", param=name)
    checks = [("logit_bias", bool(body.logit_bias)), ("tools", bool(getattr(body, "tools", None))),
              ("echo", getattr(body, "echo", False)), ("suffix", getattr(body, "suffix", None) is not None)]
    for name, used in checks:
        if used:
            raise APIError(400, f"{name} is not supported by tandem serve; leave it out", param=name)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
                       param="stop")
    return stops


# -----------------------------------------------------------------------------------------------
# FastAPI's own failures in the same shape


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif not loc:
            message = "the request body must be a JSON object (send Content-Type: application/json)"
        else:
            message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}"
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        log.error("unhandled error on %s:\n%s", request.url.path, traceback.format_exc())
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

