"""An OpenAI-compatible HTTP server over the paged engine (stdlib only).

One background thread runs engine steps; each HTTP request (one thread each) adds its request to the
engine between steps and waits on its own queue of tokens, so requests from many clients join the running
batch. Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (chat
template), with ``"stream": true`` as server-sent events ending in ``data: [DONE]``. A client that goes away
mid-stream has its request aborted and its KV blocks freed. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from labkit import LabkitError
from labkit.serve.engine import LLMEngine
from labkit.serve.sampling import SamplingParams


class EngineService:
    """Thread-safe front of an :class:`LLMEngine`: submit, stream, abort."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queues: dict[int, queue.Queue] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="labkit-engine")
        self.thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, queue.Queue]:
        q: queue.Queue = queue.Queue()
        with self.lock:
            rid = self.engine.add_request(prompt_ids, params)
            self.queues[rid] = q
        self.wake.set()
        return rid, q

    def abort(self, rid: int) -> None:
        with self.lock:
            self.engine.abort(rid)
            self.queues.pop(rid, None)

    def _loop(self) -> None:
        while not self.stopped:
            with self.lock:
                busy = self.engine.has_unfinished()
                events = self.engine.step() if busy else []
                targets = [(self.queues.get(out.request_id), out, tok) for out, tok in events]
                for out, _ in events:
                    if out.finished:
                        self.queues.pop(out.request_id, None)
            for q, out, tok in targets:
                if q is not None:
                    q.put((tok, out.finish_reason))
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=5)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def _params(body: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                              top_k=int(body.get("top_k", -1)), max_tokens=int(body.get("max_tokens", 16)),
                              ignore_eos=bool(body.get("ignore_eos", False)), seed=body.get("seed"),
                              n=int(body.get("n", 1)))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bad sampling value: {exc}") from None
    except LabkitError as exc:
        raise BadRequest(str(exc), param=str(exc).split("=")[0]) from None


class Handler(BaseHTTPRequestHandler):
    server: LabkitHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, exc: BadRequest) -> None:
        self._json(exc.status, {"error": {"message": str(exc), "type": "invalid_request_error",
                                          "param": exc.param, "code": None}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "created": 0, "owned_by": "labkit"}]})
        else:
            self._error(BadRequest(f"unknown path {self.path}", status=404))

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as exc:
                raise BadRequest(f"malformed JSON body: {exc.msg}") from None
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            model = body.get("model", self.server.model_name)
            if model != self.server.model_name:
                raise BadRequest(f"unknown model {model!r}; this server serves {self.server.model_name!r}", "model",
                                 status=404)
            path = self.path.rstrip("/")
            if path == "/v1/completions":
                chat, prompt_ids = False, self._prompt_ids(body)
            elif path == "/v1/chat/completions":
                chat, prompt_ids = True, self._chat_ids(body)
            else:
                raise BadRequest(f"unknown path {self.path}", status=404)
            params = _params(body)
            max_len = self.server.service.engine.config.max_model_len
            if len(prompt_ids) + params.max_tokens > max_len:
                raise BadRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"context length {max_len}", "max_tokens")
            try:
                rid, q = self.server.service.submit(prompt_ids, params)
            except LabkitError as exc:
                raise BadRequest(str(exc)) from None
        except BadRequest as exc:
            self._error(exc)
            return
        if body.get("stream"):
            self._stream(rid, q, chat, len(prompt_ids))
        else:
            self._complete(rid, q, chat, len(prompt_ids))

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            return self.server.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = self.server.service.engine.model.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise BadRequest(f"prompt token ids must be in 0..{vocab - 1}", "prompt")
            return prompt
        raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and
                all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
        ids = self.server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _envelope(self, rid: int, chat: bool, stream: bool) -> dict:
        kind = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else "")
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}-{uuid.uuid4().hex[:8]}", "object": kind,
                "created": int(time.time()), "model": self.server.model_name}

    def _complete(self, rid: int, q: queue.Queue, chat: bool, n_prompt: int) -> None:
        tokens, reason = [], None
        while reason is None:
            tok, reason = q.get()
            tokens.append(tok)
        text = self.server.tokenizer.decode(tokens, skip_special_tokens=True)
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        self._json(200, {**self._envelope(rid, chat, False), "choices": [choice],
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                                   "total_tokens": n_prompt + len(tokens)}})

    def _stream(self, rid: int, q: queue.Queue, chat: bool, n_prompt: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        env = self._envelope(rid, chat, True)
        tokens: list[int] = []
        sent = ""
        reason = None
        try:
            while reason is None:
                tok, reason = q.get()
                tokens.append(tok)
                text = self.server.tokenizer.decode(tokens, skip_special_tokens=True)
                delta, sent = text[len(sent):], text
                choice = {"index": 0, "finish_reason": reason, "logprobs": None}
                choice.update({"delta": {"content": delta}} if chat else {"text": delta})
                chunk = {**env, "choices": [choice]}
                if reason is not None:
                    chunk["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                                      "total_tokens": n_prompt + len(tokens)}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.server.service.abort(rid)  # the client went away: free its blocks
        self.close_connection = True


class LabkitHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], service: EngineService, tokenizer: Any, model_name: str,
                 verbose: bool = False) -> None:
        super().__init__(addr, Handler)
        self.service, self.tokenizer, self.model_name, self.verbose = service, tokenizer, model_name, verbose


def start_server(llm, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False) -> tuple[LabkitHTTPServer, threading.Thread]:
    """Serve ``llm`` (an :class:`~labkit.serve.LLM`) in a background thread; port 0 picks a free port."""
    service = EngineService(llm.engine)
    server = LabkitHTTPServer((host, port), service, llm.tokenizer, model_name, verbose)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="labkit-http")
    thread.start()
    return server, thread


def stop_server(server: LabkitHTTPServer) -> None:
    server.shutdown()
    server.server_close()
    server.service.stop()


def serve(model: str = "smollm2-135m", host: str = "127.0.0.1", port: int = 8000, block_size: int = 16,
          num_blocks: int | None = None, max_num_seqs: int = 32) -> None:
    """``labkit serve``: block until interrupted."""
    from labkit.serve.engine import LLM

    llm = LLM(model, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs)
    service = EngineService(llm.engine)
    try:
        server = LabkitHTTPServer((host, port), service, llm.tokenizer, model, verbose=True)
    except OSError as exc:
        raise LabkitError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    print(f"labkit serving {model} on http://{host}:{port}/v1 (paged KV: {llm.engine.config.num_blocks} blocks "
          f"of {block_size}); Ctrl-C to stop")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        service.stop()
