"""`pagedllm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

    POST /v1/chat/completions  /v1/completions  /tokenize  /detokenize
    GET  /v1/models  /v1/models/{id}  /health (and HEAD)  /metrics  /version
    GET  /dashboard  /dashboard/events  /debug/kv   (the live KV-cache view: dashboard.py)

Errors use OpenAI's `{"error": {message, type, param, code}}`; a 429 (queue full) and a 503
(engine dead or stopped) also carry `Retry-After` (seconds), and every 4xx is logged with its
message. With --api-key every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hmac
import logging
import os
import re
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import pagedllm
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.async_engine import AsyncLLM
from pagedllm.entrypoints.chat_utils import load_chat_template
from pagedllm.entrypoints.openai.dashboard import register_dashboard
from pagedllm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_json,
    validation_error,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_engine import (
    ClientDisconnected,
    TokenizerThread,
    to_api_error,
)
from pagedllm.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS
from pagedllm.loader.hub import is_hub_id
from pagedllm.metrics import CONTENT_TYPE

logger = logging.getLogger("pagedllm")

DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_BODY_BYTES = 16 << 20

# Seconds a client should wait before retrying: a full queue drains in about a step or two;
# a dead engine needs its server restarted (by a supervisor, if any).
RETRY_AFTER_S = {429: 1, 503: 5}


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                        help="read the model's own tool calls for tool_choice 'auto' (hermes: "
                        "<tool_call>{json}</tool_call>, SmolLM2/Qwen/Hermes templates)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="accepted for vLLM compatibility: 'auto' is on whenever "
                        "--tool-call-parser is given")
    parser.add_argument("--structured-outputs-disable-any-whitespace", action="store_true",
                        help="JSON constraints (response_format, guided_json) allow no "
                        "whitespace between tokens: small models otherwise may write whitespace "
                        "until max_tokens (vLLM's disable_any_whitespace)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the model's basename)")
    parser.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="refuse larger request bodies with a 413, before reading them "
                        "whole (default: 16 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="on SIGTERM or Ctrl-C, seconds open requests get to finish before "
                        "they are ended with an error (default: 10)")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="answer 429 (with Retry-After) to a request that finds no free "
                        "slot while this many requests already wait for one (default: no cap)")
    parser.add_argument("--max-queued-tokens", type=int, default=None,
                        help="answer 429 to a request that finds no free slot while the "
                        "waiting requests' prompts, with its own, exceed this many tokens "
                        "(default: no cap)")
    parser.add_argument("--engine-core", default="process", choices=("process", "thread"),
                        help="where the engine core's step loop runs: its own process (default; "
                        "the HTTP event loop never waits on a model step) or a thread of the "
                        "server's process")
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                        help="do not serve the live KV-cache dashboard (/dashboard, "
                        "/dashboard/events, /debug/kv)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    return parser


def served_model_name(model: str | None) -> str:
    """A Hub id as given (as vLLM serves it); a path's basename, without `.gguf` and a
    quantization tag (`.Q4_1`)."""
    if model is None:
        return DEFAULT_SERVED_MODEL_NAME
    if is_hub_id(model):
        return model
    name = os.path.basename(os.path.normpath(model))
    if name.endswith(".gguf"):
        name = re.sub(r"[.-](I?Q\d\w*|[BF]F?16|F32)$", "", name[: -len(".gguf")],
                      flags=re.IGNORECASE)
    return name


def error_response(scope: Scope, err: APIError) -> JSONResponse:
    """`err` as OpenAI's JSON body, with Retry-After where retrying later can succeed.

    A 4xx is logged with its reason: uvicorn's access log only says "400 Bad Request". The
    message names the field and limit, never the request body."""
    if 400 <= err.status < 500:
        logger.warning("%s %s -> %d: %s", scope["method"], scope["path"], err.status,
                       err.message)
    retry_after = RETRY_AFTER_S.get(err.status)
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


class APIKeyMiddleware:
    """401 unless the Bearer token matches (pure ASGI, so streaming and disconnects pass through
    untouched; BaseHTTPMiddleware would wrap `receive`)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer "
                               "<key>')", code="invalid_api_key")
                await error_response(scope, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(raw: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes (never held whole)."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes (the server's "
                         "--max-request-body-bytes)", code="request_too_large")
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(raw: Request, model: type[BaseModel],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    # No Content-Type is taken as JSON; a form or text body (`curl -d` without
    # `-H 'Content-Type: application/json'`) is a 415 that says so. Parameters (charset) and
    # `+json` types pass.
    content_type = raw.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(415, f"Content-Type must be application/json, got {media_type[:100]!r}",
                       code="unsupported_media_type")
    body = parse_json(await _read_body(raw, max_body_bytes))
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


_REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)
_REF = "#/components/schemas/{model}"


def _body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its JSON itself (_parse: size cap,
    strict numbers, nesting depth), so that schema-driven clients and fuzzers see the API."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def _publish_request_schemas(app: FastAPI) -> None:
    """Add the request models (and the models they use) to /openapi.json's components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _REQUEST_MODELS:
                body = model.model_json_schema(ref_template=_REF)
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema

    app.openapi = openapi


def build_app(engine: AsyncLLM, model_name: str, model_path: str,
              api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              compact_json: bool = False, tool_call_parser: str | None = None,
              dashboard: bool = True) -> FastAPI:
    # Detokenization runs on this event loop's thread; tokenization and templates on the
    # tokenizer's own (their cost grows with the input).
    tokenizer = engine.tokenizer
    encoder = TokenizerThread(tokenizer)
    chat = OpenAIServingChat(engine, tokenizer, model_name, encoder)
    completion = OpenAIServingCompletion(engine, tokenizer, model_name, encoder)
    chat.compact_json = completion.compact_json = compact_json
    chat.tool_call_parser = tool_call_parser
    max_model_len = engine.max_model_len
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()
        encoder.shutdown()

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    _publish_request_schemas(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.scope, exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return error_response(request.scope, err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.scope, to_api_error(exc))

    # HEAD too: load balancers probe with it (FastAPI's GET routes answer HEAD with 405).
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> Response:
        if engine.is_healthy:
            return Response(status_code=200)
        err = APIError(503, "the engine core is not running", type="service_unavailable_error")
        return error_response(request.scope, err)

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    model_card = {"id": model_name, "object": "model", "created": started,
                  "owned_by": "pagedllm", "root": model_path, "max_model_len": max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    # :path, since Hub ids (ORG/NAME) hold a slash: client.models.retrieve(id).
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        chat.check_model(model_id)  # a 404 naming the served model otherwise
        return model_card

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(raw: Request):
        return await chat.create(await _parse(raw, ChatCompletionRequest, max_body_bytes), raw)

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(raw: Request):
        return await completion.create(await _parse(raw, CompletionRequest, max_body_bytes), raw)

    @app.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize(raw: Request) -> dict:
        request = await _parse(raw, TokenizeRequest, max_body_bytes)
        chat.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if request.messages is not None:
            messages = [m.model_dump() for m in request.messages]
            chat.check_chars(sum(len(str(m.get("content") or "")) for m in messages), "messages")
            ids = await encoder.encode_chat(messages, request.add_generation_prompt is not False)
        else:
            chat.check_chars(len(request.prompt), "prompt")
            ids = await encoder.encode(request.prompt, request.add_special_tokens is not False)
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(raw: Request) -> dict:
        request = await _parse(raw, DetokenizeRequest, max_body_bytes)
        chat.check_model(request.model)
        vocab = engine.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})",
                           param="tokens")
        return {"prompt": tokenizer.decode(request.tokens)}

    if dashboard:  # /dashboard, /dashboard/events, /debug/kv (behind the API key like the rest)
        register_dashboard(app, engine, model_name)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening: taken before the model loads, so a
    port in use fails in a second rather than after the load, and nobody can take the port
    meanwhile (connections are refused until uvicorn listens, once the engine is ready).
    Raises OSError with one line that says what to do."""
    # As uvicorn binds: IPv6 for a host with a colon, else IPv4 (`localhost` included).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # As uvicorn does: a port left in TIME_WAIT by the last server can be taken again at once
    # (on Linux this never lets two servers listen on one port).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if isinstance(exc, socket.gaierror):
            raise OSError(f"--host {host!r} is not a known address ({exc.strerror})") from None
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} is already in use on {host} (another server?): stop "
                          "it, or pick a free port with --port") from None
        if exc.errno == errno.EACCES:
            raise OSError(f"no permission to listen on {where} (ports below 1024 need root): "
                          "pick another port with --port") from None
        raise OSError(f"cannot listen on {where}: {exc.strerror}; check --host and --port") \
            from None
    return sock


def run_server(args: argparse.Namespace, started: float | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C. `started`: time.monotonic() when the command began (for
    the start-up time in the ready line)."""
    started = time.monotonic() if started is None else started
    for flag in ("max_waiting", "max_queued_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    if args.max_request_body_bytes < 1:
        raise SystemExit("--max-request-body-bytes must be >= 1")
    if args.shutdown_timeout < 0:
        raise SystemExit("--shutdown-timeout must be >= 0")
    # Everything a user can get wrong is checked before the model loads: the chat template,
    # the port, then (in create_engine_config) the model.
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    sock = bind_socket(args.host, args.port)
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args),
                                       engine_core=args.engine_core, max_waiting=args.max_waiting,
                                       max_queued_tokens=args.max_queued_tokens)
    if chat_template is not None:
        engine.tokenizer.chat_template = chat_template  # what every chat request renders with
    name = args.served_model_name or served_model_name(args.model)
    app = build_app(engine, name, engine.config.model.model, args.api_key,
                    args.max_request_body_bytes,
                    args.structured_outputs_disable_any_whitespace, args.tool_call_parser,
                    args.dashboard)
    # uvicorn's own grace period only backs ours up: by then every stream has ended.
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = DrainingServer(config, engine, args.shutdown_timeout)
    url = f"http://{_url_host(args.host)}:{sock.getsockname()[1]}/v1"  # --port 0: the port taken
    server.ready_log = (started, name, url)
    server.run(sockets=[sock])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DrainingServer(uvicorn.Server):
    """SIGTERM or Ctrl-C: stop accepting, give open requests `shutdown_timeout` seconds, then
    end the rest with an error event and `[DONE]` (streams) or a 503 (the others), and exit
    0. (uvicorn alone cuts streams at its grace period without a word, and re-raises the
    signal after shutting down: exit status -15.)"""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        # (time.monotonic() at the command's start, model name, URL): logged once listening
        self.ready_log: tuple[float, str, str] | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.ready_log is not None and not self.should_exit:
            started, name, url = self.ready_log
            logger.info("ready in %.1f s: serving %s on %s", time.monotonic() - started, name,
                        url)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, lambda sig, _: self._on_signal(sig, loop))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, loop: asyncio.AbstractEventLoop) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop now
            return
        self.should_exit = True
        loop.call_soon_threadsafe(self.engine.drain, self.shutdown_timeout)
