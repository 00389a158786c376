"""The FastAPI application: OpenAI-compatible endpoints, the persona endpoints and the web page.

Handlers do no model work. They validate (pydantic models, then
:class:`~persona_lens.serving.resolve.Resolver`), hand a
:class:`~persona_lens.serving.engine.Ticket` to the engine and turn its events into a JSON body
or a server-sent event stream. Errors always have the OpenAI shape; bad input is a 4xx, never
a 500. An error after a stream has started is sent as an ``{"error": ...}`` event followed by
``[DONE]``. A client that disconnects cancels its ticket, and the engine drops its row before
the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from persona_lens.core.version import __version__
from persona_lens.serving.engine import Engine, Failed, Finished, Sink, Started, Ticket
from persona_lens.serving.errors import APIError, error_body, from_validation
from persona_lens.serving.protocol import ChatCompletionRequest, CompletionRequest
from persona_lens.serving.resolve import GenerationJob, Resolver
from persona_lens.serving.responses import Reply

log = logging.getLogger("persona_lens.serving")

GRACE_S = 10.0
"""How long past its deadline a handler waits for the engine's own timeout event."""

_STATUS_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class BodyLimit:
    """ASGI middleware: read a request body up to ``limit`` bytes, else answer 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.limit
        except ValueError:
            await _json(400, error_body("malformed Content-Length header"))(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        more = not too_big
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = bool(message.get("more_body")) and total <= self.limit
            too_big = total > self.limit
        if too_big:
            body = error_body(
                f"the request body exceeds this server's {self.limit} bytes",
                code="request_too_large",
            )
            await _json(413, body)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _remaining(ticket: Ticket) -> float:
    return ticket.deadline - time.monotonic() + GRACE_S


async def _watch_disconnect(request: Request, ticket: Ticket) -> None:
    """Cancel ``ticket`` when the client goes away (for handlers that are not streaming)."""
    while not ticket.cancelled.is_set():
        if await request.is_disconnected():
            ticket.cancel()
            return
        await asyncio.sleep(0.25)


def create_app(engine: Engine, resolver: Resolver, model_id: str) -> FastAPI:
    """The application serving ``engine`` (already started) under the name ``model_id``."""
    settings = engine.settings
    started_at = int(time.time())
    app = FastAPI(
        title="persona-lens",
        version=__version__,
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN; the schema stays
        redoc_url=None,
        summary="OpenAI-compatible API with per-request persona steering and per-token trait "
        "projections.",
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    # --- errors ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _json(exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = from_validation(exc.errors())
        return _json(error.status, error.body())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        if exc.status_code >= 500:
            kind = "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _json(exc.status_code, error_body(str(exc.detail), kind, None, code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _json(500, error_body("internal server error", "server_error", None, "internal"))

    # --- auth -----------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="The server's --api-key, if it has one.")

    async def check_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        key = settings.api_key
        if key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            what = "no API key given" if credentials is None else "the API key is wrong"
            raise APIError(
                401,
                f"{what}; send 'Authorization: Bearer KEY'",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    # --- running a job --------------------------------------------------------------------
    async def run(job: GenerationJob, request: Request, stream: bool, usage: bool) -> Response:
        ticket = Ticket(job, Sink(), time.monotonic() + settings.request_timeout)
        engine.submit(ticket)
        watcher = asyncio.create_task(_watch_disconnect(request, ticket))
        reply = Reply(job, model_id, include_usage=usage)
        try:
            first = await ticket.sink.get(_remaining(ticket))
        except TimeoutError:
            ticket.cancel()
            watcher.cancel()
            raise _timeout() from None
        except BaseException:
            ticket.cancel()
            watcher.cancel()
            raise
        if not isinstance(first, Started):
            watcher.cancel()
            raise first.error if isinstance(first, Failed) else _server_error()
        if stream:
            watcher.cancel()
            return StreamingResponse(
                _events(reply, ticket, first, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            reply.add(first)
            while reply.finished is None:
                event = await ticket.sink.get(_remaining(ticket))
                if isinstance(event, Failed):
                    raise event.error
                reply.add(event)
        except TimeoutError:
            raise _timeout() from None
        finally:
            ticket.cancel()
            watcher.cancel()
        return _json(200, reply.body())

    async def _events(
        reply: Reply, ticket: Ticket, first: Started, usage: bool
    ) -> AsyncIterator[str]:
        try:
            reply.add(first)
            yield _sse(reply.chunk(first))
            while True:
                try:
                    event = await ticket.sink.get(_remaining(ticket))
                except TimeoutError:
                    yield _sse(_timeout().body())
                    break
                if isinstance(event, Failed):
                    yield _sse(event.error.body())
                    break
                reply.add(event)
                yield _sse(reply.chunk(event))
                if isinstance(event, Finished):
                    if usage:
                        yield _sse(reply.usage_chunk())
                    break
            yield _sse("[DONE]")
        finally:
            ticket.cancel()  # a no-op after the end; frees the row if the client has left

    # --- OpenAI endpoints -----------------------------------------------------------------
    @api.post("/chat/completions", summary="Chat completion (streaming or not)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await run(resolver.chat(body), request, bool(body.stream), body.include_usage())

    @api.post("/completions", summary="Text completion of a raw prompt (streaming or not)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await run(
            resolver.completion(body), request, bool(body.stream), body.include_usage()
        )

    def model_card() -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": started_at,
            "owned_by": "persona-lens",
        }

    @api.get("/models", summary="The served model")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model}", summary="One served model")
    async def model(model: str) -> dict[str, Any]:
        if model not in resolver.model_ids:
            raise APIError(
                404, f"the model {model!r} does not exist", param="model", code="model_not_found"
            )
        return model_card()

    # --- persona endpoints ----------------------------------------------------------------
    @api.get("/persona/vectors", summary="The loaded vectors with their metadata")
    async def vectors() -> dict[str, Any]:
        return {"object": "list", "data": [v.describe() for v in resolver.library]}

    @api.get("/persona/stats", summary="What the engine has done so far")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    app.include_router(api)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # --- the page -------------------------------------------------------------------------
    static = resources.files("persona_lens.serving") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    with resources.as_file(static) as folder:
        app.mount("/static", StaticFiles(directory=folder), name="static")

    _document_names(app, resolver)
    return app


def _server_error() -> APIError:
    return APIError(500, "the engine answered out of order", "server_error", None, "internal")


def _timeout() -> APIError:
    return APIError(408, "the request timed out", "timeout_error", None, "timeout")


def _document_names(app: FastAPI, resolver: Resolver) -> None:
    """Name the served model and the loaded vectors in the OpenAPI schema (as enums), so a
    schema-driven client or fuzzer can form valid requests."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.get("components", {}).get("schemas", {})
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            model = components.get(name, {}).get("properties", {}).get("model")
            if model is not None:
                model["enum"] = list(resolver.model_ids)
        names = resolver.library.names
        persona = components.get("PersonaOptions", {}).get("properties", {})
        if names and persona:
            for key in ("steer", "layers", "guard"):
                if key in persona:
                    persona[key]["propertyNames"] = {"enum": names}
            for option in persona.get("monitor", {}).get("anyOf", []):
                if option.get("type") == "array":
                    option["items"] = {"type": "string", "enum": names}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
