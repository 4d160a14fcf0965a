"""Every error becomes OpenAI's error JSON: {"error": {"message", "type", "param", "code"}} (Anthropic's on the Messages
API's paths); never a stack trace."""
import logging
import re
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.async_engine import RequestFailed

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its requests are aborted."""


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500
                                                                   else "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# Anthropic's Messages API (server/messages.py) answers in Anthropic's shape, which its SDK and Claude Code read:
# {"type": "error", "error": {"type", "message"}}, with the same HTTP statuses; the handlers pick it by the path
ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error_for(path: str, status: int, message: str, param: str | None = None, code: str | int | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error JSON, or Anthropic's for the Messages API (which has no `param`: the message names it)."""
    if not path.startswith(ANTHROPIC_PATH):
        return error_response(status, message, param, code, headers)
    if param and param.split(".")[0] not in message:
        message = f"{param}: {message}"
    return JSONResponse(anthropic_error_body(status, message), status_code=status, headers=headers)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|function-.*|[A-Z]\w*)$")


def _param_path(loc) -> str:
    """("body", "messages", 0, "content", "str") -> "messages[0].content": union members' tags dropped."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.match(part):
            path += f".{part}" if path else part
    return path


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = _param_path(first.get("loc", ())) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error_for(request.url.path, exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_for(request.url.path, 400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error_for(request.url.path, exc.status_code, str(exc.detail))

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError):
        return _error_for(request.url.path, 400, str(exc), code="invalid_value")

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, exc: RequestFailed):
        return _error_for(request.url.path, 500, str(exc), code="request_failed")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error serving %s", request.url.path)
        return _error_for(request.url.path, 500, "internal server error", code="internal_error")


class BodySizeLimit:
    """Pure ASGI middleware: 413 for request bodies over the limit, whether declared or sent in chunks.

    The body is read here (up to the limit) and replayed to the app, so an oversized body never reaches a route."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for http.disconnect, as a streaming response does

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        response = _error_for(scope.get("path", ""), 413, f"request body exceeds {self.max_bytes} bytes",
                              code="body_too_large")
        await response(scope, receive, send)


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (nothing to check without a key)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")


def unavailable(draining: bool) -> APIError:
    """The 503 of a server whose model is still loading, or that is draining."""
    return APIError(503, "the server is draining" if draining else "the model is still loading", code="unavailable")
