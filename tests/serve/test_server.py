"""The OpenAI-compatible server over real HTTP on loopback, with the tiny random model."""

import http.client
import json
import socket
import threading
import time

import pytest

from labkit.serve import LLM
from labkit.serve.client import bench_serve
from labkit.serve.server import start_server, stop_server
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def server(tokenizer):
    llm = LLM(tiny_llama(seed=2), tokenizer, block_size=4, max_model_len=256, max_num_seqs=16)
    srv, _ = start_server(llm, "tiny")
    yield srv
    stop_server(srv)


def request(srv, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_models_lists_the_model(server):
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"


def test_completion_matches_engine_and_counts_usage(server):
    prompt = [5, 6, 7, 8, 9, 10]
    status, body = request(server, "POST", "/v1/completions",
                           {"model": "tiny", "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    assert status == 200
    d = json.loads(body)
    assert d["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    assert d["choices"][0]["finish_reason"] == "length"
    assert server.service.engine.bm.num_free == len(server.service.engine.bm.blocks)


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


def test_streaming_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hello there", "max_tokens": 5, "stream": True,
                                                        "temperature": 0, "ignore_eos": True}))
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream"
    lines = [ln for ln in resp.read().decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert len(chunks) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("body,raw,param", [
    (None, "{not json", None),
    ({"model": "gpt-4", "prompt": "x"}, None, "model"),
    ({"prompt": "x", "temperature": -1}, None, "temperature"),
    ({"prompt": ""}, None, "prompt"),
    ({"prompt": list(range(3, 300)), "max_tokens": 10}, None, "max_tokens"),
    ({"messages": "hi"}, None, "messages"),
])
def test_bad_requests_get_openai_style_400(server, body, raw, param):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    status, resp = request(server, "POST", path, body, raw)
    assert status in (400, 404)
    err = json.loads(resp)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


def test_concurrent_clients_join_one_batch(server):
    eng = server.service.engine
    steps_before = eng.stats.steps
    results = []

    def client(i):
        results.append(request(server, "POST", "/v1/completions",
                               {"prompt": [10 + i] * 8, "max_tokens": 12, "temperature": 0, "ignore_eos": True}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s == 200 for s, _ in results)
    assert eng.stats.steps - steps_before < 6 * 12  # batched: far fewer steps than one request at a time
    assert eng.bm.num_free == len(eng.bm.blocks)


def test_disconnect_mid_stream_frees_blocks(server):
    eng = server.service.engine
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
    body = json.dumps({"prompt": [7] * 20, "max_tokens": 200, "stream": True, "temperature": 0, "ignore_eos": True})
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while b"data:" not in got:
        got += sock.recv(4096)
    assert eng.has_unfinished()
    sock.close()
    for _ in range(200):
        if eng.bm.num_free == len(eng.bm.blocks) and not eng.has_unfinished():
            break
        time.sleep(0.05)
    assert eng.bm.num_free == len(eng.bm.blocks) and not eng.has_unfinished()


def test_load_generator_reports_percentiles(server):
    s = bench_serve(f"http://127.0.0.1:{server.server_address[1]}", num_requests=6, request_rate=50.0,
                    prompt_len=(4, 12), output_len=(2, 6), seed=1, slo_ttft_ms=1e6)
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["ttft_ms_p50"] <= s["ttft_ms_p99"] and s["e2e_ms_p99"] >= s["ttft_ms_p99"]
    assert s["goodput_requests_per_s"] == pytest.approx(s["request_throughput"])


def test_load_generator_bad_url():
    from labkit import LabkitError

    with pytest.raises(LabkitError, match="url="):
        bench_serve("ftp://x", num_requests=1)
    with pytest.raises(LabkitError, match="request_rate=0"):
        bench_serve("http://127.0.0.1:1", num_requests=1, request_rate=0)

