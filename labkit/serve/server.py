"""An OpenAI-compatible HTTP server over the paged engine: FastAPI + uvicorn, the shape vLLM's server has.

One background thread owns the engine (:class:`~labkit.serve.service.EngineService`); each HTTP request posts
its request to the
thread's inbox, which the thread drains between steps, and awaits its own queue of tokens, so requests from many
clients join the running batch and no handler ever waits for a step. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (chat template),
``"stream": true`` as server-sent events ending in ``data: [DONE]``, ``GET /health`` and ``GET /metrics``
(Prometheus text). Failures are answered, never swallowed: a bad body is an OpenAI-style 400, an engine step
that raises fails the requests in its batch with a 500 (their blocks freed) and the engine serves on, and
a client that goes away mid-stream has its request aborted. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from labkit import LabkitError
from labkit.serve.detokenizer import TextStream
from labkit.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from labkit.serve.service import EngineService, Event

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt max_model_len admits; the kit's choice, configurable
ENGINE_DIED_EXIT = 3  # `labkit serve`'s exit status when its engine thread died (a supervisor restarts it)


# ----------------------------------------------------------------------------------------------- the app

def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
    param = loc[0] if loc else None
    what = err.get("msg", "invalid value")
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    return APIError(400, f"{'.'.join(loc) or 'body'}: {what}{shown}", param=param, code="invalid_value")


class OpenAIApp:
    """The routes, over one :class:`EngineService`; ``build()`` returns the FastAPI app."""

    def __init__(self, service: EngineService, tokenizer: Any, model_name: str, request_timeout_s: float = 600.0,
                 body_timeout_s: float = 10.0, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise LabkitError(f"max_body_bytes={max_body_bytes!r} must be a positive number of bytes")
        if api_key is not None and not api_key:
            raise LabkitError("api_key='' would accept any client; give a key or None (no key)")
        self.service, self.tokenizer, self.model_name = service, tokenizer, model_name
        self.request_timeout_s, self.body_timeout_s = request_timeout_s, body_timeout_s
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    def build(self) -> FastAPI:
        app = FastAPI(title="labkit OpenAI-compatible server", version="1")

        @app.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(404)
        async def _not_found(request: Request, exc: Exception) -> JSONResponse:
            err = APIError(404, f"unknown path {request.url.path}", code="not_found")
            return JSONResponse(err.body(), status_code=404)

        @app.exception_handler(405)
        async def _bad_method(request: Request, exc: Exception) -> JSONResponse:
            err = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
            return JSONResponse(err.body(), status_code=405)

        @app.get("/health")
        async def health() -> JSONResponse:
            s = self.service
            alive = s.thread.is_alive()
            body = {"status": "ok" if s.healthy and alive else "unhealthy", "engine_thread_alive": alive,
                    "failed_steps": s.failed_steps}  # no exception text: that goes to the server's log
            return JSONResponse(body, status_code=200 if s.healthy and alive else 503)

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            """vLLM's --api-key: every /v1 route wants ``Authorization: Bearer <key>`` (/health, /metrics stay open)."""
            if self.api_key is not None and request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    err = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                    return JSONResponse(err.body(), status_code=401)
            return await call_next(request)

        from labkit.serve.metrics import prometheus_text

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            text, content_type = prometheus_text(self.service.metrics(), self.model_name)
            return PlainTextResponse(text, media_type=content_type)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "labkit"}]}

        schema = lambda model: {"requestBody": {"required": True, "content": {  # noqa: E731
            "application/json": {"schema": model.model_json_schema()}}}}

        @app.post("/v1/completions", openapi_extra=schema(CompletionRequest))
        async def completions(request: Request):
            body = self._parse(CompletionRequest, await self._json(request))
            ids = await asyncio.to_thread(self._prompt_ids, body)  # tokenizing never blocks the event loop
            return await self._respond(body, ids, chat=False)

        @app.post("/v1/chat/completions", openapi_extra=schema(ChatCompletionRequest))
        async def chat(request: Request):
            body = self._parse(ChatCompletionRequest, await self._json(request))
            ids = await asyncio.to_thread(self._chat_ids, body)  # nor does the chat template
            return await self._respond(body, ids, chat=True)

        return app

    # -------------------------------------------------------------------------------------- parsing
    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to pass ``max_body_bytes`` (from Content-Length
        before reading anything, else while it streams in): a large body is never held whole in memory."""
        too_big = APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes:,} "
                                "bytes", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json(self, request: Request) -> Any:
        try:
            raw = await asyncio.wait_for(self._read_body(request), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"the request body did not arrive within {self.body_timeout_s:g} s (does "
                                "Content-Length match the body?)", code="incomplete_body") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from None

    def _parse(self, model, obj: Any):
        if not isinstance(obj, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            body = model.model_validate(obj)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def _prompt_ids(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            ids = self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"] if body.prompt else []
        else:
            ids = list(body.prompt)
            vocab = self.service.engine.model.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside 0..{vocab - 1}", "prompt", "invalid_value")
        if not ids:
            raise APIError(400, "prompt is empty; give at least one token", "prompt", "invalid_value")
        return self._check_length(ids, body, "prompt")

    def _chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        messages = [m.model_dump() for m in body.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self._check_length(ids, body, "messages")

    def _check_length(self, ids: list[int], body, param: str) -> list[int]:
        limit = self.service.engine.config.max_model_len
        max_tokens = body.sampling_params().max_tokens
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"this model's context is {limit} tokens; the {param} has {len(ids)} and max_tokens "
                                f"asks for {max_tokens} more", param, "context_length_exceeded")
        return ids

    # -------------------------------------------------------------------------------------- answering
    def _envelope(self, chat: bool, stream: bool) -> dict:
        kind = "chat.completion" + (".chunk" if stream else "") if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.model_name}

    async def _respond(self, body, prompt_ids: list[int], chat: bool):
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        try:
            ticket = self.service.submit(prompt_ids, body.sampling_params(),
                                         lambda ev: loop.call_soon_threadsafe(inbox.put_nowait, ev))
        except LabkitError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        events = self._events(ticket, inbox, TextStream(self.tokenizer, body.stop))
        if body.stream:
            gen = self._sse(events, chat, len(prompt_ids), body.include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, n_out, reason = "", 0, None
        async for event in events:
            delta, n_out, reason, error = event  # the last event carries the totals
            if error:
                raise APIError(500, error, type="server_error", code="engine_error")
            text += delta
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse(
            {**self._envelope(chat, False), "choices": [choice], "usage": _usage(len(prompt_ids), n_out)}
        )

    async def _events(self, ticket: int, tokens: asyncio.Queue, text: TextStream) -> AsyncIterator[tuple]:
        """``(text delta, output tokens so far, finish reason, error)`` until the request ends; aborts the
        engine request when the consumer stops early (client gone, stop string, timeout)."""
        n_out, done = 0, False
        try:
            while not done:
                try:
                    tok, reason, error = await asyncio.wait_for(tokens.get(), self.request_timeout_s)
                except asyncio.TimeoutError:
                    yield "", n_out, "error", f"no token within {self.request_timeout_s:g} s; request aborted"
                    return
                if error:
                    done = True
                    yield "", n_out, "error", error
                    return
                n_out += 1
                delta = text.push(tok)
                if text.stopped:
                    reason = "stop"
                done = reason is not None
                if done:
                    delta += text.finish()
                if delta or done:
                    yield delta, n_out, reason, None
        finally:
            if not done or text.stopped:
                self.service.abort(ticket)

    async def _sse(self, events, chat: bool, n_prompt: int, include_usage: bool) -> AsyncIterator[bytes]:
        env = self._envelope(chat, True)

        def chunk(choices: list, usage: dict | None = None) -> bytes:
            payload = {**env, "choices": choices}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n".encode()

        def choice(delta: str, reason: str | None, first: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
                return {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            return {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}

        if chat:
            yield chunk([choice("", None, first=True)])
        n_out = 0
        async for event in events:
            delta, n_out, reason, error = event
            if error:
                err = APIError(500, error, type="server_error", code="engine_error")
                yield f"data: {json.dumps(err.body())}\n\n".encode()
                break
            yield chunk([choice(delta, reason)])
        if include_usage:
            yield chunk([], _usage(n_prompt, n_out))
        yield b"data: [DONE]\n\n"


def _usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


# ----------------------------------------------------------------------------------------------- running it

class ServerHandle:
    """A server running in a background thread (tests, notebooks): ``.url``, ``.port``, ``.service``."""

    def __init__(self, server, thread: threading.Thread, sock: socket.socket, service: EngineService) -> None:
        self.server, self.thread, self.sock, self.service = server, thread, sock, service
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"


def check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise LabkitError(f"port={port!r} must be an integer in 0..65535 (0 picks a free port)")
    return port


def _bind(host: str, port: int) -> socket.socket:
    check_port(port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LabkitError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    return sock


def _uvicorn(app, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))


def start_server(llm, model_name: str, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
                 request_timeout_s: float = 600.0, body_timeout_s: float = 10.0, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_in_flight: int | None = None) -> ServerHandle:
    """Serve ``llm`` (a :class:`~labkit.serve.LLM`) in a background thread; port 0 picks a free port.
    ``max_in_flight`` bounds the requests admitted at once: one more is answered 503 at once."""
    check_exposure(host, api_key, allow_unauthenticated=False)
    service = EngineService(llm.engine, max_in_flight=max_in_flight)  # a bad bound fails before the port is taken
    sock = _bind(host, port)
    app = OpenAIApp(service, llm.tokenizer, model_name, request_timeout_s, body_timeout_s, api_key,
                    max_body_bytes).build()
    server = _uvicorn(app, "info" if verbose else "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="labkit-http")
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            service.stop()
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return ServerHandle(server, thread, sock, service)


def stop_server(handle: ServerHandle) -> None:
    """Answer every request in flight (an error event: the server is going), then shut the HTTP side down."""
    handle.service.stop()
    handle.server.should_exit = True
    handle.thread.join(timeout=10)
    handle.sock.close()


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond this machine without an API key, unless told explicitly."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if not loopback and api_key is None and not allow_unauthenticated:
        raise LabkitError(f"host={host!r} is reachable from other machines and no API key is set: give --api-key "
                          "(clients send 'Authorization: Bearer <key>'), or --allow-unauthenticated if this network "
                          "is yours alone")


def serve(model: str = "smollm2-135m", host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          allow_unauthenticated: bool = False, max_body_bytes: int = MAX_BODY_BYTES, max_in_flight: int | None = None,
          dtype: str = "auto", **engine_args: Any) -> None:
    """``labkit serve``: block until interrupted. ``dtype``: ``"auto"`` is bf16 where this device multiplies it
    natively, fp32 elsewhere (said at start-up). ``engine_args`` are :class:`EngineConfig` fields;
    ``max_in_flight`` bounds the requests admitted at once (one more gets a 503). Exits with status
    :data:`ENGINE_DIED_EXIT` if the engine thread dies, so a supervisor restarts it."""
    from labkit.serve.config import EngineConfig
    from labkit.serve.llm import LLM

    check_exposure(host, api_key, allow_unauthenticated)
    EngineConfig.from_kwargs(**engine_args)  # a bad setting fails before the port is taken or the model loads
    from labkit import env

    chosen = env.resolve_dtype(dtype)
    if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
        raise LabkitError(f"max_in_flight={max_in_flight!r} must be a positive integer, or None for no bound")
    sock = _bind(host, port)  # fail on a bad or busy port before loading the model
    llm = LLM(model, dtype=chosen, **engine_args)
    died: list[BaseException] = []
    server = None

    def on_death(exc: BaseException) -> None:  # tell uvicorn to stop; the process then exits non-zero
        died.append(exc)
        print(f"labkit serve: the engine thread died ({type(exc).__name__}: {exc}); shutting down", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    service = EngineService(llm.engine, on_death=on_death, max_in_flight=max_in_flight)
    app = OpenAIApp(service, llm.tokenizer, model, api_key=api_key, max_body_bytes=max_body_bytes).build()
    cfg = llm.engine.config
    print(f"labkit serving {model} on http://{host}:{sock.getsockname()[1]}/v1 (KV: {cfg.num_blocks} blocks of "
          f"{cfg.block_size}, {'paged' if cfg.paged else 'contiguous'}; {env.dtype_name(chosen)}"
          + (f", {env.auto_dtype()[1]}" if dtype == "auto" else "") + "); Ctrl-C to stop")
    server = _uvicorn(app, "info")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.stop()
    if died:
        raise SystemExit(ENGINE_DIED_EXIT)
