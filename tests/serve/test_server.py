"""The OpenAI-compatible server over real HTTP on loopback, with the tiny random model."""

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the server needs fastapi (a labkit dependency; absent on bare GPU images)")

from labkit.serve import LLM  # noqa: E402
from labkit.serve.client import bench_serve  # noqa: E402
from labkit.serve.protocol import APIError  # noqa: E402
from labkit.serve.sampling import SamplingParams  # noqa: E402
from labkit.serve.server import start_server, stop_server  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def server(tokenizer):
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=256, max_num_seqs=16)
    srv = start_server(llm, "tiny", body_timeout_s=1.0)
    yield srv
    stop_server(srv)


def request(srv, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def no_leak(srv, wait_s: float = 10.0) -> bool:
    """Every block back on the free list and no request left in the engine (waits for in-flight aborts)."""
    eng = srv.service.engine
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if srv.service.call(lambda e: e.bm.num_free == len(e.bm.blocks) and not e.has_unfinished()
                            and not e.requests):
            return not srv.service.sinks and not eng.generators and not srv.service.live
        time.sleep(0.02)
    return False


def healthy(srv) -> bool:
    status, body = request(srv, "GET", "/health")
    return status == 200 and json.loads(body)["status"] == "ok"


def test_models_lists_the_model(server):
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"


def test_completion_matches_engine_and_counts_usage(server, tokenizer):
    prompt = [5, 6, 7, 8, 9, 10]
    status, body = request(server, "POST", "/v1/completions",
                           {"model": "tiny", "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    assert status == 200
    d = json.loads(body)
    assert d["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    assert d["choices"][0]["finish_reason"] == "length"
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=256)
    from labkit.serve import SamplingParams

    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)[0]
    assert d["choices"][0]["text"] == tokenizer.decode(ref.token_ids, skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=False)
    assert no_leak(server)


def test_chat_completion_uses_chat_template(server, tokenizer):
    status, body = request(server, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
                            "ignore_eos": True})
    d = json.loads(body)
    assert status == 200 and d["object"] == "chat.completion"
    n_prompt = len(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                 tokenize=True)["input_ids"])
    assert d["usage"]["prompt_tokens"] == n_prompt
    assert d["choices"][0]["message"]["role"] == "assistant"


def sse(srv, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    events = [ln for ln in resp.read().decode().split("\n\n") if ln]
    conn.close()
    assert events[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in events[:-1]]


def test_streaming_text_equals_non_streamed_and_usage_comes_last(server):
    body = {"prompt": "Hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    _, plain = request(server, "POST", "/v1/completions", body)
    chunks = sse(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == json.loads(plain)["choices"][0]["text"]


def test_chat_stream_first_chunk_carries_the_role(server):
    chunks = sse(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                   "temperature": 0, "ignore_eos": True, "stream": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


def test_stop_string_ends_the_text_and_frees_blocks(server):
    body = {"prompt": [11, 12, 13], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    full = json.loads(request(server, "POST", "/v1/completions", body)[1])["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    d = json.loads(request(server, "POST", "/v1/completions", {**body, "stop": [stop]})[1])
    assert d["choices"][0]["text"] == full[:full.index(stop)]
    assert d["choices"][0]["finish_reason"] == "stop"
    streamed = sse(server, "/v1/completions", {**body, "stop": stop, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in streamed) == full[:full.index(stop)]
    assert no_leak(server)


BAD = [  # (path, body or raw string, expected status, param, code)
    ("/v1/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "seed": "7"}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": list(range(3, 300)), "max_tokens": 10}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "invalid_value"),
    ("/v1/nothing", {"prompt": "x"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD)
def test_bad_requests_get_openai_style_errors(server, path, body, status, param, code):
    raw = body if isinstance(body, str) else None
    got, resp = request(server, "POST", path, None if raw else body, raw)
    assert got == status
    err = json.loads(resp)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param and err["code"] == code
    assert no_leak(server) and healthy(server)


def test_content_length_that_lies(server):
    # Claims more than it sends: answered 400 once the body timeout passes, instead of hanging forever.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 400\r\n\r\n" + b'{"prompt": "x"}')
    got = b""
    while b"\r\n\r\n" not in got or b"}}" not in got:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    sock.close()
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert b'"incomplete_body"' in got
    # Claims less than it sends: the JSON is cut short.
    status, resp = request(server, "POST", "/v1/completions", raw='{"prompt": "x", "max_tokens": 2}',
                           headers={"Content-Length": "10"})
    assert status == 400 and json.loads(resp)["error"]["code"] == "invalid_json"
    assert no_leak(server) and healthy(server)


def test_sixteen_concurrent_clients_join_one_batch(server):
    eng = server.service.engine
    steps_before = eng.stats.steps
    eng.stats.max_running = 0  # this test's own peak
    results = []

    def client(i):
        results.append(request(server, "POST", "/v1/completions",
                               {"prompt": [10 + i] * 8, "max_tokens": 12, "temperature": 0, "ignore_eos": True}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and all(s == 200 for s, _ in results)
    assert all(json.loads(b)["usage"]["completion_tokens"] == 12 for _, b in results)
    assert eng.stats.steps - steps_before < 16 * 12  # batched: far fewer steps than one request at a time
    assert eng.stats.max_running >= 4  # requests really shared steps (one at a time would peak at 1)
    assert no_leak(server) and healthy(server)


def test_disconnect_mid_stream_frees_blocks(server):
    eng = server.service.engine
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": [7] * 20, "max_tokens": 200, "stream": True, "temperature": 0, "ignore_eos": True})
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while b"data:" not in got:
        got += sock.recv(4096)
    assert eng.has_unfinished()
    sock.close()
    assert no_leak(server) and healthy(server)


def scrape(srv) -> dict[str, float]:
    """/metrics parsed with prometheus_client's own parser: {sample name: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = request(srv, "GET", "/metrics")
    assert status == 200
    return {s.name: s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_metrics_report_engine_state_in_prometheus_format(server):
    status, body = request(server, "GET", "/metrics")
    text = body.decode()
    assert "# TYPE labkit:num_requests_running gauge" in text and "# HELP labkit:generation_tokens_total " in text
    assert "# TYPE labkit:generation_tokens_total counter" in text and 'model_name="tiny"' in text
    m = scrape(server)
    assert m["labkit:num_requests_running"] == 0 and m["labkit:kv_cache_blocks_used"] == 0
    assert m["labkit:kv_cache_blocks_total"] == len(server.service.engine.bm.blocks)
    assert m["labkit:kv_cache_usage_perc"] == 0
    before = m["labkit:generation_tokens_total"]
    request(server, "POST", "/v1/completions", {"prompt": [3, 4], "max_tokens": 5, "ignore_eos": True})
    assert scrape(server)["labkit:generation_tokens_total"] == before + 5


@contextlib.contextmanager
def failing_step(srv, at: int, message: str):
    """Make the engine's ``at``-th model step from now raise ``RuntimeError(message)``."""
    runner = srv.service.engine.runner
    real_run, calls = runner.run, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise RuntimeError(message)
        return real_run(*a, **k)

    runner.run = flaky
    try:
        yield
    finally:
        runner.run = real_run


@contextlib.contextmanager
def slow_step(srv, seconds: float):
    """Make the engine's next model step take ``seconds`` longer; yields an Event set when that step begins."""
    runner = srv.service.engine.runner
    real_run, began = runner.run, threading.Event()

    def slow(*a, **k):
        if not began.is_set():
            began.set()
            time.sleep(seconds)
        return real_run(*a, **k)

    runner.run = slow
    try:
        yield began
    finally:
        runner.run = real_run


def test_handlers_answer_while_a_slow_step_runs(server):
    """The HTTP handlers never wait for a step: health, metrics and a new request's acceptance answer while a
    2-second step runs (a lock held for the step would make each of them wait for it)."""
    first = []
    with slow_step(server, 2.0) as began:
        t = threading.Thread(target=lambda: first.append(request(server, "POST", "/v1/completions", {
            "prompt": [4] * 5, "max_tokens": 3, "ignore_eos": True})))
        t.start()
        assert began.wait(10)
        took = {"health": [], "metrics": [], "accept": []}
        for _ in range(3):
            for what, path in (("health", "/health"), ("metrics", "/metrics")):
                t0 = time.perf_counter()
                assert request(server, "GET", path)[0] == 200
                took[what].append(time.perf_counter() - t0)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps({"prompt": [6] * 4, "max_tokens": 2, "stream": True,
                                                                "ignore_eos": True}))
            resp = conn.getresponse()  # the status line: the request was accepted into the inbox
            took["accept"].append(time.perf_counter() - t0)
            assert resp.status == 200
            conn.close()  # hangs up: the engine drops the request when it drains its inbox
        still_in_step = t.is_alive()
    t.join()
    assert still_in_step and first[0][0] == 200
    for what, times in took.items():
        assert sorted(times)[1] < 0.05, (what, times)  # the median of three, against a 2 s step
    assert no_leak(server) and healthy(server)


def test_stop_answers_in_flight_clients_at_once(tokenizer):
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=64)
    srv = start_server(llm, "tiny")
    got = []
    try:
        with slow_step(srv, 3.0) as began:
            t = threading.Thread(target=lambda: got.append(sse(srv, "/v1/completions", {
                "prompt": [3] * 5, "max_tokens": 8, "ignore_eos": True, "stream": True})))
            t.start()
            assert began.wait(10)
            stopper = threading.Thread(target=srv.service.stop)
            t0 = time.perf_counter()
            stopper.start()
            t.join(2.0)
            answered_in = time.perf_counter() - t0
            assert not t.is_alive(), "the in-flight client was not answered while the step still ran"
            stopper.join()
    finally:
        stop_server(srv)
    assert answered_in < 2.0 and "shutting down" in got[0][-1]["error"]["message"]
    with pytest.raises(APIError, match="shutting down"):
        srv.service.submit([1, 2], SamplingParams(max_tokens=2), lambda ev: None)


def test_a_failing_engine_step_fails_its_requests_and_serving_goes_on(server):
    with failing_step(server, 3, "injected failure"):
        status, body = request(server, "POST", "/v1/completions", {"prompt": [5] * 6, "max_tokens": 8,
                                                                   "ignore_eos": True})
        assert status == 500
        err = json.loads(body)["error"]
        assert err["type"] == "server_error" and "RuntimeError" in err["message"]
        assert "injected failure" not in err["message"]  # the exception's text goes to the log, not to clients
        chunks = sse(server, "/v1/completions", {"prompt": [5] * 6, "max_tokens": 4, "ignore_eos": True,
                                                 "stream": True})
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the next request is served
    assert no_leak(server) and healthy(server)
    assert server.service.failed_steps >= 1


def test_a_failing_step_mid_stream_sends_an_error_event(server):
    with failing_step(server, 4, "boom"):
        chunks = sse(server, "/v1/completions", {"prompt": [9] * 6, "max_tokens": 20, "ignore_eos": True,
                                                 "stream": True})
    assert "error" in chunks[-1] and "RuntimeError" in chunks[-1]["error"]["message"]
    assert no_leak(server) and healthy(server)


def test_openai_client_drives_completions_and_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    c = client.completions.create(model="tiny", prompt="The weather", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="The weather", max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == c.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts, usage = [], None
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        usage = ch.usage or usage
    assert "".join(parts) == chat.choices[0].message.content and usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-1)
    assert no_leak(server)


def test_load_generator_reports_percentiles(server):
    s = bench_serve(server.url, num_requests=6, request_rate=50.0, prompt_len=(4, 12), output_len=(2, 6), seed=1,
                    slo_ttft_ms=1e6)
    assert s["completed"] == 6 and s["failed"] == 0 and s["requests"] == 6
    assert s["ttft_ms_p50"] <= s["ttft_ms_p99"] and s["e2e_ms_p99"] >= s["ttft_ms_p99"]
    assert s["goodput_requests_per_s"] == pytest.approx(s["request_throughput"])


def test_load_generator_counts_failures(server):
    # Prompts longer than the context: every request fails with a 400 and is counted, none lost.
    s = bench_serve(server.url, num_requests=4, prompt_len=(300, 310), output_len=(2, 3), seed=0)
    assert s["requests"] == 4 and s["completed"] == 0 and s["failed"] == 4
    assert "HTTP 400" in s["errors"][0]


def test_load_generator_bad_arguments():
    from labkit import LabkitError

    with pytest.raises(LabkitError, match="url="):
        bench_serve("ftp://x", num_requests=1)
    with pytest.raises(ValueError, match="request_rate=0"):
        bench_serve("http://127.0.0.1:1", num_requests=1, request_rate=0)
    with pytest.raises(LabkitError, match=r"prompt_len=\(10, 5\)"):
        bench_serve("http://127.0.0.1:1", num_requests=1, prompt_len=(10, 5))


def test_load_generator_runs_inside_an_event_loop_as_in_jupyter(server):
    import asyncio

    async def notebook_cell():
        return bench_serve(server.url, num_requests=2, prompt_len=(4, 6), output_len=(2, 3), seed=2)

    assert asyncio.run(notebook_cell())["completed"] == 2


def test_speculating_server_streams_every_token_once(server, tokenizer):
    """With n-gram speculation a request gains several tokens in one step: each reaches the stream, the finish
    reason only with the last."""
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=256,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    srv = start_server(llm, "tiny")
    try:
        body = {"prompt": [7, 8, 9, 10] * 6, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        chunks = sse(srv, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
        _, plain = request(server, "POST", "/v1/completions", body)  # the same model without speculation
        assert chunks[-1]["usage"]["completion_tokens"] == 20
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("length") == 1
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == json.loads(plain)["choices"][0]["text"]
        metrics = scrape(srv)
        assert metrics["labkit:spec_decode_num_accepted_tokens_total"] > 0
        assert (
            metrics["labkit:spec_decode_num_draft_tokens_total"]
            >= metrics["labkit:spec_decode_num_accepted_tokens_total"]
        )
        assert no_leak(srv)
    finally:
        stop_server(srv)


# ------------------------------------------------------------------------------ hardening: no request stops it
def test_a_request_the_engine_cannot_take_fails_alone(server):
    """add_request raising anything (not only the kit's own errors) answers that request; the engine goes on."""
    engine = server.service.engine
    real = engine.add_request

    def broken(*a, **k):
        engine.add_request = real  # once
        raise OverflowError("an internal limit")

    engine.add_request = broken
    try:
        status, body = request(server, "POST", "/v1/completions", {"prompt": [5] * 4, "max_tokens": 2})
    finally:
        engine.add_request = real
    assert status == 500 and "OverflowError" in json.loads(body)["error"]["message"]
    assert server.service.thread.is_alive() and healthy(server)
    status, _ = request(server, "POST", "/v1/completions", {"prompt": [5] * 4, "max_tokens": 2})
    assert status == 200 and no_leak(server)


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("seed", -1), ("temperature", 1e-9),
                                          ("top_k", 2**40), ("max_tokens", 2**40)])
def test_values_the_engine_or_torch_cannot_take_are_a_400_naming_the_field(server, field, value):
    status, body = request(server, "POST", "/v1/completions", {"prompt": [5] * 4, "max_tokens": 2, field: value})
    err = json.loads(body)["error"]
    assert status == 400 and err["param"] == field and str(value)[:6] in err["message"], err
    assert healthy(server)


def test_a_dead_engine_answers_503_at_once(tokenizer):
    llm = LLM(tiny_llama(seed=3), tokenizer, block_size=4, max_model_len=64, max_num_seqs=4)
    died = []
    srv = start_server(llm, "tiny")
    srv.service.on_death = died.append
    try:
        def broken_state():
            raise MemoryError("a bug in the loop itself")

        srv.service._read_state = broken_state  # escapes every per-request guard: the thread ends
        srv.service.wake.set()
        srv.service.thread.join(timeout=10)
        assert not srv.service.thread.is_alive() and isinstance(died[0], MemoryError)
        status, body = request(srv, "GET", "/health")
        assert status == 503 and json.loads(body) == {"status": "unhealthy", "engine_thread_alive": False,
                                                      "failed_steps": 0}
        assert "a bug" not in body.decode()  # no exception text on /health
        t0 = time.monotonic()
        status, body = request(srv, "POST", "/v1/completions", {"prompt": [5] * 4, "max_tokens": 2})
        assert status == 503 and json.loads(body)["error"]["code"] == "engine_dead"
        assert time.monotonic() - t0 < 5  # at once, never a hang until the request timeout
    finally:
        stop_server(srv)


_WILD_INT = st.one_of(st.integers(-3, 6), st.integers(2**31 - 2, 2**31 + 2), st.integers(2**62, 2**70),
                      st.integers(-(2**70), -(2**31)))
_WILD_FLOAT = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64), st.just(1e-300),
                        st.just(5e-324), st.floats(0, 2))
_ANY = st.one_of(_WILD_INT, _WILD_FLOAT, st.text(max_size=8), st.booleans(), st.none(),
                 st.lists(st.integers(-5, 70000), max_size=4))
_FIELDS = {"max_tokens": st.one_of(st.integers(1, 4), _ANY), "temperature": st.one_of(_WILD_FLOAT, _ANY),
           "top_p": st.one_of(_WILD_FLOAT, _ANY), "top_k": st.one_of(_WILD_INT, _ANY), "n": _ANY,
           "seed": st.one_of(_WILD_INT, _ANY), "stop": st.one_of(st.lists(st.text(max_size=3), max_size=6), _ANY),
           "ignore_eos": _ANY, "stream": st.booleans(), "model": st.one_of(st.just("tiny"), _ANY),
           "prompt": st.one_of(st.text(max_size=30), st.lists(_WILD_INT, max_size=8), _ANY),
           "max_completion_tokens": _ANY}


@settings(max_examples=300, deadline=None, derandomize=True,  # the same requests every run: CI stays reproducible
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional=_FIELDS), chat=st.booleans())
@example(body={"prompt": [5, 6], "seed": 2**64, "temperature": 0.7}, chat=False)  # killed the engine thread once
@example(body={"top_p": 1e-300, "max_tokens": 2}, chat=True)  # fp32 rounded it to 0: no token kept, a 500
@example(body={"prompt": "hi", "temperature": 1e-30}, chat=False)  # logits / t overflow to inf
def test_any_generated_request_gets_200_or_4xx_and_the_engine_lives(server, body, chat):
    if chat:
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
        body.setdefault("max_tokens", 2)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, raw = request(server, "POST", path, body)
    assert status == 200 or 400 <= status < 500, (status, body, raw[:300])
    assert server.service.thread.is_alive() and server.service.healthy


def test_an_api_key_guards_every_v1_route(tokenizer):
    llm = LLM(tiny_llama(seed=4), tokenizer, block_size=4, max_model_len=64, max_num_seqs=4)
    srv = start_server(llm, "tiny", api_key="s3cret-key")
    try:
        body = {"prompt": [5] * 3, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"},
                        {"Authorization": "Bearer s3cret-ke"}):
            status, raw = request(srv, "POST", "/v1/completions", body, headers=headers)
            assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key", headers
        assert request(srv, "GET", "/v1/models")[0] == 401
        assert request(srv, "POST", "/v1/completions", body, headers={"Authorization": "Bearer s3cret-key"})[0] == 200
        assert request(srv, "GET", "/health")[0] == 200 and request(srv, "GET", "/metrics")[0] == 200  # open, as vLLM's
    finally:
        stop_server(srv)


def test_a_server_beyond_loopback_needs_a_key_or_an_explicit_yes(tokenizer):
    from labkit import LabkitError
    from labkit.serve.server import check_exposure

    llm = LLM(tiny_llama(seed=4), tokenizer, block_size=4, max_model_len=64, max_num_seqs=4)
    with pytest.raises(LabkitError, match="host='0.0.0.0'.*--api-key"):
        start_server(llm, "tiny", host="0.0.0.0")
    check_exposure("0.0.0.0", "k", allow_unauthenticated=False)
    check_exposure("0.0.0.0", None, allow_unauthenticated=True)
    check_exposure("127.0.0.1", None, allow_unauthenticated=False)


def test_a_body_over_the_limit_is_refused_before_it_is_read(tokenizer):
    llm = LLM(tiny_llama(seed=4), tokenizer, block_size=4, max_model_len=64, max_num_seqs=4)
    srv = start_server(llm, "tiny", max_body_bytes=2048, body_timeout_s=2.0)
    try:
        status, raw = request(srv, "POST", "/v1/completions", {"prompt": "x" * 4000, "max_tokens": 2})
        assert status == 413 and "2,048 bytes" in json.loads(raw)["error"]["message"]
        # Content-Length announces 10 MB and nothing follows: refused at once from the header, not after a timeout
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 10000000\r\n\r\n{")
            t0 = time.monotonic()
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 413") and time.monotonic() - t0 < 1.5
        # chunked, with no length: counted while it streams in
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"400\r\n" + b" " * 1024 + b"\r\n"
                                                                          for _ in range(3)))
            assert s.recv(4096).decode().startswith("HTTP/1.1 413")
        assert request(srv, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 2})[0] == 200
    finally:
        stop_server(srv)


def test_admission_bound_answers_503_and_never_admits_more(tokenizer):
    """With max_in_flight=2 and the engine thread held between steps, five concurrent requests: exactly two are
    admitted (and later answered in full), three get a 503 naming the bound at once; the gauge never passes 2."""
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=64)
    srv = start_server(llm, "tiny", max_in_flight=2)
    release, held = threading.Event(), threading.Event()
    results, peak = [], []
    try:
        threading.Thread(target=srv.service.call, args=(lambda eng: (held.set(), release.wait(30)), 60),
                         daemon=True).start()  # the engine thread waits between steps until released
        assert held.wait(10)
        body = {"prompt": [3] * 5, "max_tokens": 4, "ignore_eos": True}
        threads = [threading.Thread(target=lambda: results.append(request(srv, "POST", "/v1/completions", body)))
                   for _ in range(5)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while sum(1 for s, _ in results if s == 503) < 3 and time.time() < deadline:
            peak.append(srv.service.metrics()["requests_in_flight"])
            time.sleep(0.01)
        assert sum(1 for s, _ in results if s == 503) == 3
        release.set()
        for t in threads:
            t.join(30)
        statuses = sorted(s for s, _ in results)
        assert statuses == [200, 200, 503, 503, 503]
        err = json.loads(next(b for s, b in results if s == 503))["error"]
        assert err["code"] == "overloaded" and "max_in_flight=2" in err["message"]
        assert max(peak) <= 2
        _, text = request(srv, "GET", "/metrics")
        assert 'labkit:request_rejected_total{model_name="tiny"} 3.0' in text.decode()
        assert no_leak(srv)
    finally:
        release.set()
        stop_server(srv)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bad_admission_bound_is_named(tokenizer, bad):
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match=rf"max_in_flight={bad!r} must be a positive integer"):
        start_server(llm, "tiny", max_in_flight=bad)
