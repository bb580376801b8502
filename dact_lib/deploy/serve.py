"""A REST service over a :class:`~dact_lib.deploy.predictor.Predictor` (FastAPI, served by uvicorn).

* ``POST /predict`` — body ``{"text": "..."}`` or ``{"texts": ["...", ...]}`` → ``{"predictions": [{"label",
  "probability", "probabilities", "exit_layer" (DACT), "tasks" (multi-task), "ms"}], "ms", "model": {"kind",
  "runtime", "policy"}}``. ``ms`` of the answer: the whole request, from its body read to the answer built; each
  prediction's ``ms``: its share of the model's time (the texts of one request run as one batch, so the batch's
  time is split evenly).
* ``GET /health`` → ``{"status": "ok"}`` (answers while a prediction runs: the model runs in a worker thread);
* ``GET /model`` → ``Predictor.describe()`` (kind, tasks, labels, layers, policy, runtime, source, the measured
  exit front).

Every bad request gets a 4xx answer ``{"error": "<the problem and the fix>"}`` (400: not JSON; 404 / 405: no such
route; 413: body over the limit; 422: a JSON body with a missing, unknown or wrong field, an empty list, a blank,
too long or too many texts), never a traceback; an unexpected failure is a 500 with a short message and is logged
with its traceback. One prediction runs at a time (a lock around the model); the event loop stays free.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DactLabError
from .predictor import encodable

log = logging.getLogger(__name__)

EXAMPLE = '{"text": "a gorgeous, moving film"} or {"texts": ["first text", "second text"]}'
ROUTES = "POST /predict, GET /model, GET /health"


class BadRequest(Exception):
    """A request the service refuses: its HTTP status and the message (the problem and the fix)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes — by its Content-Length before a byte is
    read, else while it streams in (a chunked body)."""
    too_big = (f"The request body is over the limit of {limit:,} bytes: send fewer or shorter texts per request "
               "(split the list).")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(400, "The Content-Length header is not a number: send a valid HTTP request.") from None
        if size > limit:
            raise BadRequest(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


# complexity: one check per malformed body a client can send, each with its own 4xx message
def parse_request(raw: bytes, *, max_texts: int, max_chars: int) -> tuple[list[str], bool]:
    """``(texts, single)`` from a /predict body, or :class:`BadRequest` naming the problem and the fix."""
    if not raw.strip():
        raise BadRequest(400, f"The request body is empty: send JSON such as {EXAMPLE}.")
    try:
        body = json.loads(raw.decode("utf-8-sig"))  # JSON is UTF-8 (RFC 8259): no guessing of UTF-16/32
    except RecursionError:
        raise BadRequest(400, f"The request body is nested too deeply: send JSON such as {EXAMPLE}.") from None
    except UnicodeDecodeError:
        raise BadRequest(400, f"The request body is not UTF-8 text: send UTF-8 JSON such as {EXAMPLE}.") from None
    except ValueError as exc:
        where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadRequest(400, f"The request body is not valid JSON{where}: send JSON such as {EXAMPLE}.") from None
    if not isinstance(body, dict):
        raise BadRequest(422, f"The request body is a JSON {_type_name(body)}, not an object: send {EXAMPLE}.")
    unknown = sorted(k for k in body if k not in ("text", "texts"))
    if unknown:
        raise BadRequest(422, f"Unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: the "
                              f"body takes \"text\" (one string) or \"texts\" (a list of strings), e.g. {EXAMPLE}.")
    if "text" in body and "texts" in body:
        raise BadRequest(422, "The body has both \"text\" and \"texts\": send one of them (put every text in "
                              "\"texts\").")
    if "text" not in body and "texts" not in body:
        raise BadRequest(422, f"The body has no \"text\" or \"texts\" field: send {EXAMPLE}.")
    single = "text" in body
    if single:
        if not isinstance(body["text"], str):
            raise BadRequest(422, f"\"text\" is a {_type_name(body['text'])}, not a string: send "
                                  '{"text": "your sentence"}.')
        texts = [body["text"]]
    else:
        texts = body["texts"]
        if not isinstance(texts, list):
            raise BadRequest(422, f"\"texts\" is a {_type_name(texts)}, not a list: send "
                                  '{"texts": ["first text", "second text"]} (or {"text": "..."} for one).')
        if not texts:
            raise BadRequest(422, "\"texts\" is an empty list: send at least one text.")
        if len(texts) > max_texts:
            raise BadRequest(422, f"\"texts\" has {len(texts)} texts, over the limit of {max_texts} per request: "
                                  f"split the list into requests of at most {max_texts} texts.")
    for i, t in enumerate(texts):
        where = "\"text\"" if single else f"texts[{i}]"
        if not isinstance(t, str):
            raise BadRequest(422, f"{where} is a {_type_name(t)}, not a string: send every text as a JSON string.")
        if not t.strip():
            raise BadRequest(422, f"{where} is empty: give every text some words, or leave the empty one out.")
        if not encodable(t):
            raise BadRequest(422, f"{where} holds a lone surrogate code point (e.g. \\ud800), not text: send it as "
                                  "UTF-8 text.")
        if len(t) > max_chars:
            raise BadRequest(422, f"{where} has {len(t):,} characters, over the limit of {max_chars:,}: shorten it "
                                  "or split it into several texts.")
    return texts, single


def _short(predictor) -> dict:
    return {"kind": predictor.kind, "runtime": predictor.runtime, "policy": predictor.policy}


def _clean(res: dict, ms: float) -> dict:
    out = {k: res[k] for k in ("label", "probability", "probabilities", "exit_layer", "tasks") if k in res}
    out["ms"] = round(ms, 3)
    return out


# complexity: the routes are closures over the predictor and its lock; each route's checks are flat
def create_app(predictor, *, max_texts: int = 64, max_chars: int = 2000, max_body_bytes: int = 1_000_000) -> FastAPI:
    """The FastAPI application serving ``predictor`` (see the module's docstring)."""
    for name, value in (("max_texts", max_texts), ("max_chars", max_chars), ("max_body_bytes", max_body_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DactLabError(f"{name} = {value!r}: give a whole number >= 1.")
    app = FastAPI(title="DACT Lab model", description=f"{predictor.kind} model ({predictor.runtime}): {ROUTES}",
                  docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN: none offline
    lock = threading.Lock()  # one prediction at a time; the event loop stays free for /health
    # one worker thread of our own (the lock serialises predictions anyway), not anyio's shared to_thread pool
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dact-lab-predict")
    described: dict[str, Any] = {}

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"There is no {request.url.path}: the service answers {ROUTES}."
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}: the service answers {ROUTES}."
        else:
            msg = str(exc.detail)
        return _error(exc.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:  # pragma: no cover - no models
        return _error(422, f"Invalid request: send {EXAMPLE}.")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"Internal error ({type(exc).__name__}); the server's log has the details.")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        if not described:
            described.update(predictor.describe())
        return described

    @app.get("/")
    async def index() -> dict:
        return {"service": "DACT Lab model", "routes": ROUTES.split(", "), "model": _short(predictor)}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        raw = await read_body(request, max_body_bytes)
        texts, _ = parse_request(raw, max_texts=max_texts, max_chars=max_chars)

        def run() -> tuple[list[dict], float]:
            with lock:
                start = time.perf_counter()
                got = predictor.predict(texts)
                return got, time.perf_counter() - start

        try:
            results, model_s = await asyncio.get_running_loop().run_in_executor(worker, run)
        except DactLabError as exc:  # the model refused the input (checked above: should not happen)
            return _error(422, str(exc))
        except Exception:  # noqa: BLE001 - logged with its traceback, answered without it
            log.exception("prediction failed for a request of %d text(s)", len(texts))
            return _error(500, "The prediction failed with an internal error; the server's log has the details.")
        each = model_s * 1000.0 / len(texts)
        body = {"predictions": [_clean(r, each) for r in results],
                "ms": round((time.perf_counter() - t0) * 1000.0, 3), "model": _short(predictor)}
        return JSONResponse(body)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (bound here, so a busy port is a clear error before the model
    serves anything)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise DactLabError(f"--port {port!r}: give a port number from 1 to 65535.")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DactLabError(f"--host {host!r} cannot be resolved ({exc.strerror}): give an address of this machine, "
                           "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).") from None
    family, _, _, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP. Without it a
    # keep-alive client waited out Nagle + delayed ACK on every response: 44 ms for a 3 ms prediction (measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise DactLabError(f"Cannot listen on {host}:{port} ({exc.strerror}): the port is taken or not allowed; "
                           "pick another with --port.") from None
    sock.set_inheritable(True)
    return sock


def make_server(predictor, host: str = "127.0.0.1", port: int = 8000, *, max_texts: int = 64,
                max_chars: int = 2000, max_body_bytes: int = 1_000_000, log_level: str = "info",
                sock: socket.socket | None = None):
    """``(uvicorn.Server, bound socket)``: run it with ``server.run(sockets=[sock])`` (in a thread, or the main
    thread to stop on Ctrl-C); stop it with ``server.should_exit = True``. ``port`` 0 picks a free port
    (``sock.getsockname()[1]``); ``sock``: a socket already bound (host and port are then ignored)."""
    import uvicorn

    app = create_app(predictor, max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes)
    sock = sock if sock is not None else bind_socket(host, port)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10)
    return uvicorn.Server(config), sock


def serve(predictor, host: str = "127.0.0.1", port: int = 8000, *, max_texts: int = 64, max_chars: int = 2000,
          max_body_bytes: int = 1_000_000, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve ``predictor`` on ``http://host:port`` until interrupted (Ctrl-C / SIGTERM)."""
    server, sock = make_server(predictor, host, port, max_texts=max_texts, max_chars=max_chars,
                               max_body_bytes=max_body_bytes, log_level=log_level, sock=sock)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
