"""The FastAPI application: routes, error shapes, body/auth guard, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import cloud_api, openai_api, tgi_api
from router.core import HTTPError, RouterState, ServerSettings
from router.validation import ValidationError

log = logging.getLogger("router")
OPEN_PATHS = {
    "/health", "/ping", "/metrics", "/info", "/docs", "/openapi.json", "/api-doc/openapi.json",
    "/docs/oauth2-redirect",
}  # fmt: skip
# GET / is TGI's health check; POST / generates (and needs the key like every generation route)


def _is_open(method: str, path: str) -> bool:
    return path in OPEN_PATHS or (path == "/" and method == "GET")


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


class ClientTooSlow(OSError):
    """The client took longer than the bound to accept bytes (an OSError: Starlette then
    treats it as a disconnect, the stream ends, its request is cancelled, its slot freed)."""


class BodyGuard:
    """Pure ASGI middleware, before any route: the Host header (a loopback server without an
    API key answers only to loopback names, against DNS rebinding), the API key
    (constant-time compare), a JSON content type, the payload limit (413) and the client
    timeout (a body that arrives slower, or a reply the client does not read for that long,
    ends the request). The body is read once and replayed; later receives pass through."""

    def __init__(self, app, settings: ServerSettings) -> None:
        self.app = app
        self.limit = settings.payload_limit
        self.api_key = settings.api_key
        self.allowed_hosts = settings.allowed_hosts
        self.timeout = settings.client_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rejection = self._reject_headers(scope, headers)
        if rejection is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, rejection = await self._read_body(receive)
            if rejection is None:
                receive = _replay(body, receive)
        if rejection is not None:
            return await rejection(scope, receive, send)
        try:
            await self.app(scope, receive, _bounded(send, self.timeout))
        except ClientTooSlow as exc:  # the reply is cut; the server closes the connection
            log.warning("%s %s: %s", scope["method"], scope["path"], exc)

    def _reject_headers(self, scope, headers: dict[str, str]):
        if self.allowed_hosts and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return error_response(
                421, "misdirected_request", "this server answers only to its loopback names"
            )
        if self.api_key and not _is_open(scope["method"], scope["path"]):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.api_key.encode()
            ):
                return error_response(
                    401, "authentication", "missing or wrong API key (Authorization: Bearer)"
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > self.limit:
                return error_response(
                    413, "payload_too_large", f"request body over {self.limit} bytes"
                )
            content_type = headers.get("content-type", "")
            if not content_type.split(";")[0].strip().lower().endswith("json"):
                return error_response(
                    415, "unsupported_media_type", "Content-Type must be application/json"
                )
        return None

    async def _read_body(self, receive):
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return b"", error_response(
                            400, "bad_request", "the client closed the request"
                        )
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        return b"", error_response(
                            413, "payload_too_large", f"request body over {self.limit} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        return b"".join(chunks), None
        except TimeoutError:
            return b"", error_response(
                408, "request_timeout", f"the request body took over {self.timeout:g} s"
            )


def _host_name(host: str) -> str:
    """The name of a Host header without its port: "[::1]:3000" -> "[::1]"."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _bounded(send, timeout: float):
    """`send` that gives up after `timeout` seconds of a client not reading. One timer per
    response, re-armed at most once per `timeout` and checked only when it fires: an
    `asyncio.timeout` around every send (a timer made and cancelled per streamed token) took
    ~8% of the router's CPU per token."""
    return _Watchdog(send, timeout).send


class _Watchdog:
    """Invariant: `since` is set exactly while a send is pending; the timer, once armed,
    fires no later than `since + timeout` of any send pending then."""

    def __init__(self, send, timeout: float) -> None:
        self._send, self._timeout = send, timeout
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._task: asyncio.Task | None = None  # the task of the latest send
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False

    async def send(self, message) -> None:
        self._since = self._loop.time()
        self._task = asyncio.current_task()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout, self._check)
        try:
            await self._send(message)
        except asyncio.CancelledError:
            if not self._fired:
                raise
        finally:
            self._since = None
        if self._fired:  # our cancellation, not the caller's: the client is too slow
            self._fired = False
            self._task.uncancel()  # type: ignore[union-attr]  # set above
            raise ClientTooSlow(f"the client read nothing for {self._timeout:g} s")
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._stop()  # the response's last message: nothing left to watch

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # no send pending: the next one arms the timer again
        left = self._since + self._timeout - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check)
        elif self._task is not None:
            self._fired = True
            self._task.cancel()


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "bad_request", "the request body is not valid JSON"
    first = errors[0] if errors else {}
    location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return 422, "validation", f"{location or 'body'}: {first.get('msg', 'invalid request')}"


def create_app(state: RouterState) -> FastAPI:
    app = FastAPI(
        title="pytgi", version="0.1.0", description="TGI- and OpenAI-compatible LLM server"
    )
    app.state.router = state

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.error_type, exc.message)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        state.metrics.on_failure("validation")
        return error_response(422, "validation", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        status, error_type, message = _describe_validation(exc)
        state.metrics.on_failure(error_type)
        return error_response(status, error_type, message)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException):
        kinds = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "http"), str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")

    @app.get("/health", summary="200 when every shard answers Health")
    @app.get("/ping", summary="Health, as SageMaker asks for it")
    @app.get("/", summary="Health (TGI answers GET / as /health)")
    async def health() -> Response:
        try:
            await state.scheduler.client.health()
        except Exception as exc:  # noqa: BLE001
            log.warning("health: a shard did not answer: %s", exc)
            return error_response(503, "unhealthy", "a shard is not healthy")
        if not await state.scheduler.confirm_liveness():
            return error_response(503, "unhealthy", "the shards failed a liveness prefill")
        return Response(status_code=200)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        """The OpenAPI document where TGI serves it (also at /openapi.json)."""
        return JSONResponse(app.openapi())

    app.include_router(tgi_api.api)
    app.include_router(openai_api.api)
    app.include_router(cloud_api.api)
    app.add_middleware(BodyGuard, settings=state.settings)
    if state.settings.cors_allow_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.settings.cors_allow_origin),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


def create_metrics_app(metrics):
    """The --prometheus-port server: GET /metrics, nothing else (no key, as on the API port)."""

    async def app(scope, receive, send) -> None:
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            response: Response = Response(metrics.render(), media_type="text/plain; version=0.0.4")
        else:
            response = error_response(404, "not_found", "this port serves GET /metrics only")
        await response(scope, receive, send)

    return app


__all__ = ["create_app", "create_metrics_app", "error_response"]
