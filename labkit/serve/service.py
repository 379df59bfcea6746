"""The engine's own thread, and the only way in (the server's other half: :mod:`labkit.serve.server` is HTTP).

HTTP handlers never wait for a step: :class:`EngineService` takes requests into an inbox its thread drains between
steps, hands each request's tokens to that request's sink, answers every failure to the request(s) it concerns,
and, if the thread itself ever dies, tells every client in flight and refuses new work at once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from labkit import LabkitError
from labkit.serve.engine import LLMEngine
from labkit.serve.protocol import APIError
from labkit.serve.sampling import SamplingParams

Event = tuple[int | None, str | None, str | None]  # (new token, finish reason, error message)
log = logging.getLogger("labkit.serve")


class EngineService:
    """The engine's own thread, and the only way in: an inbox it drains between steps.

    HTTP handlers never wait for a step. ``submit`` checks the request against the engine's limits, hands it to
    the inbox and returns its ticket at once; ``abort`` and :meth:`call` are inbox messages too, and
    :meth:`metrics` reads the snapshot the engine thread publishes after every step. Only the engine thread
    touches the engine. Tokens reach each request through its ``sink`` callback, called from the engine thread.
    If a step raises, the requests in the running batch get an ``error`` event and are aborted (their blocks go
    back to the pool), and the block accounting is checked; if it is broken the service turns unhealthy and
    refuses new work rather than serve from a corrupt cache. ``stop`` answers every request still in flight at
    once, without waiting for the step that is running.
    """

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05,
                 on_death: Callable[[BaseException], None] | None = None, max_in_flight: int | None = None) -> None:
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise LabkitError(f"max_in_flight={max_in_flight!r} must be a positive integer (requests admitted and "
                              "not yet finished), or None for no bound")
        self.engine, self.on_death, self.max_in_flight = engine, on_death, max_in_flight
        self.admit = threading.Lock()  # the bound's check and the admission are one step
        self.requests_rejected = 0
        self.inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.sinks: dict[int, Callable[[Event], None]] = {}  # ticket -> sink; entries leave with dict.pop (atomic)
        self.tickets = itertools.count(1)
        self.live: dict[int, int] = {}  # engine request id -> ticket (engine thread only)
        self.ids: dict[int, int] = {}  # ticket -> engine request id (engine thread only)
        self.idle_wait_s = idle_wait_s
        self.healthy, self.last_error = True, None
        self.failed_steps = self.tokens_generated = self.requests_finished = self.requests_failed = 0
        self.stopped = False
        self._snapshot = self._read_state()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="labkit-engine")
        self.thread.start()

    # ------------------------------------------------------------------------------- any thread
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> int:
        """Queue a request; returns its ticket (for :meth:`abort`). Raises at once if it can never run."""
        if self.stopped:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.thread.is_alive():
            raise APIError(503, "the engine has stopped; restart the server", type="server_error",
                           code="engine_dead")
        if not self.healthy:
            raise APIError(503, "the engine is unhealthy (its block accounting broke); restart the server",
                           type="server_error", code="engine_unhealthy")
        self.engine.check_request(prompt_ids, params)
        with self.admit:
            if self.max_in_flight is not None and len(self.sinks) >= self.max_in_flight:
                self.requests_rejected += 1
                raise APIError(503, f"the server is at capacity: {len(self.sinks)} requests in flight "
                                    f"(max_in_flight={self.max_in_flight}); retry later", type="server_error",
                               code="overloaded")
            ticket = next(self.tickets)
            self.sinks[ticket] = sink
        self._post(("add", ticket, list(prompt_ids), params))
        return ticket

    def abort(self, ticket: int) -> None:
        self.sinks.pop(ticket, None)
        self._post(("abort", ticket))

    def call(self, fn: Callable[[LLMEngine], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result (tests, inspection)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("call", fn, done))
        return done.result(timeout_s)

    def metrics(self) -> dict[str, float]:
        """The engine's state after its last step (published by the engine thread; no waiting)."""
        return {**self._snapshot, "generation_tokens_total": self.tokens_generated,
                "requests_finished_total": self.requests_finished, "requests_failed_total": self.requests_failed,
                "engine_failed_steps_total": self.failed_steps, "healthy": int(self.healthy),
                "requests_in_flight": len(self.sinks), "requests_rejected_total": self.requests_rejected}

    def stop(self) -> None:
        """Stop the engine thread; every request still in flight gets an error event now."""
        self.stopped = True
        self.wake.set()
        for ticket in list(self.sinks):
            if (sink := self.sinks.pop(ticket, None)) is not None:
                _deliver(sink, (None, "error", "the server is shutting down; request aborted"))
        self.thread.join(timeout=5)

    def _post(self, message: tuple) -> None:
        self.inbox.put(message)
        self.wake.set()

    # ------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        """Serve until stopped. A failure inside a step or a request is answered to its request(s) and serving goes
        on; anything that still escapes (a bug in this loop) ends the thread cleanly: every client in flight gets
        an error event, new requests get a 503 at once, and ``on_death`` is told (``labkit serve`` exits non-zero
        so a supervisor can restart it)."""
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - the thread is ending: nobody may be left waiting
            self.healthy, self.last_error = False, f"engine thread died: {type(exc).__name__}"
            for ticket in list(self.sinks):
                if (sink := self.sinks.pop(ticket, None)) is not None:
                    _deliver(sink, (None, "error", "the engine stopped while running this request; retry later"))
            if self.on_death is not None:
                self.on_death(exc)

    def _serve(self) -> None:
        while not self.stopped:
            self._drain()
            busy = self.engine.has_unfinished()
            deliveries = self._step() if busy else []
            self._snapshot = self._read_state()
            if not self.stopped:
                for sink, event in deliveries:
                    _deliver(sink, event)
            if not busy:
                self.wake.wait(self.idle_wait_s)
                self.wake.clear()

    def _drain(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            kind, *args = message
            if kind == "add":
                ticket, prompt_ids, params = args
                if ticket not in self.sinks:  # aborted (or the server stopped) before it reached the engine
                    continue
                try:
                    rid = self.engine.add_request(prompt_ids, params)
                except Exception as exc:  # noqa: BLE001 - checked in submit; whatever still fails is this request's
                    self.requests_failed += 1
                    reason = str(exc) if isinstance(exc, LabkitError) else f"the engine could not take this request " \
                        f"({type(exc).__name__})"
                    if (sink := self.sinks.pop(ticket, None)) is not None:
                        _deliver(sink, (None, "error", reason))
                    continue
                self.live[rid], self.ids[ticket] = ticket, rid
            elif kind == "abort":
                rid = self.ids.pop(args[0], None)
                if rid is not None:
                    self.live.pop(rid, None)
                    self.engine.abort(rid)
            else:  # "call"
                fn, done = args
                try:
                    done.set_result(fn(self.engine))
                except Exception as exc:  # noqa: BLE001 - handed back to the caller
                    done.set_exception(exc)

    def _finish(self, rid: int) -> Callable[[Event], None] | None:
        """Forget a request the engine is done with; returns its sink if its client is still there."""
        ticket = self.live.pop(rid, None)
        if ticket is None:
            return None
        self.ids.pop(ticket, None)
        return self.sinks.pop(ticket, None)

    def _step(self) -> list[tuple[Callable[[Event], None], Event]]:
        deliveries = []
        try:
            events = self.engine.step()
            last = {out.request_id: i for i, (out, _) in enumerate(events)}  # several tokens a step when speculating
            for i, (out, tok) in enumerate(events):
                self.tokens_generated += 1
                done = out.finished and last[out.request_id] == i
                if done:
                    self.requests_finished += 1
                    sink = self._finish(out.request_id)
                else:
                    sink = self.sinks.get(self.live.get(out.request_id, -1))
                if sink is not None:
                    deliveries.append((sink, (tok, out.finish_reason if done else None, None)))
        except Exception as exc:  # noqa: BLE001 - any failure must reach the clients
            deliveries += self._fail_step(exc)
        return deliveries

    def _fail_step(self, exc: Exception) -> list[tuple[Callable[[Event], None], Event]]:
        """Abort the batch a failed step was running (or the waiting request nothing can hold)."""
        self.failed_steps += 1
        self.last_error = type(exc).__name__  # the text goes to the log, not to clients
        log.error("engine step failed: %s: %s", type(exc).__name__, exc)
        failed = self.engine.abort_running("error")
        if not failed:
            out = self.engine.abort_waiting_head("error")
            failed = [out] if out is not None else []
        try:
            self.engine.check_consistent()
        except RuntimeError as bad:
            self.healthy, self.last_error = False, f"{self.last_error}; then {bad}"
        self.requests_failed += len(failed)
        msg = f"the engine failed while running this request ({self.last_error})"
        return [(s, (None, "error", msg)) for out in failed if (s := self._finish(out.request_id))]

    def _read_state(self) -> dict[str, int]:
        return self.engine.state()


def _deliver(sink: Callable[[Event], None], event: Event) -> None:
    try:
        sink(event)
    except RuntimeError:  # the client's event loop is gone (server shutting down)
        pass
