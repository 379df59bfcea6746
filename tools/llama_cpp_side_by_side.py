"""Batch-1 decode: llama.cpp (through llama-cpp-python) beside the kit's own loop, same model, same threads,
one process.

    python tools/llama_cpp_side_by_side.py --f32 smollm2-f32.gguf     (about 3 minutes on 2 cores)

Needs ``llama-cpp-python`` (``pip install -e .[llamacpp]``: it builds llama.cpp from source, ~10 minutes on 2
cores; on a VM where ggml's AMX kernels die with SIGILL, build without them:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON ..."``); without it
the tool says so and stops. ``--f32``: SmolLM2-135M as an F32 GGUF, made from the kit's own weights with llama.cpp's
converter (``convert_hf_to_gguf.py ~/.cache/labkit/smollm2-135m/fp32 --outtype f32``; its sdist carries it under
``vendor/llama.cpp``); the tool converts it to BF16, F16, Q8_0 and Q4_1 with ``llama_model_quantize`` beside it. Without
``--f32`` only the Q4_1 GGUF the kit's weights come from (``labkit fetch``) is timed.

Every variant decodes 16 greedy tokens after the same 32-token prompt (prefill untimed), one warm-up, then 3 rounds
in rotated order (:func:`labkit.measure.interleaved`); tok/s is median (min-max). The kit's rows run
``labkit.decode.StaticDecoder`` (its fastest loop) in fp32 and bf16, plain and prepacked (``labkit.prepack``), and
the quantization experiment's int8/int4 variants; greedy tokens are
compared with the kit's fp32 loop.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from labkit import measure, zoo
from labkit.quant import Int4Config, Int8Config, quantize_

PROMPT, NEW = list(range(1000, 1032)), 16
THREADS = 2


def llama_cpp_decoder(path: Path):
    """A timed decode (seconds) over a llama.cpp model, and the tokens of its last run."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=64, verbose=False)
    vocab, tokens = llm.n_vocab(), []

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def run() -> float:
        llm.reset()
        llm.eval(PROMPT)
        tokens[:] = [argmax()]
        t0 = time.perf_counter()
        for _ in range(NEW):
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        return time.perf_counter() - t0
    return run, tokens


def kit_decoder(model, dtype, prepack: bool = False):
    """The same decode in the kit's static loop (``prepack``: its float linears packed for oneDNN)."""
    from labkit.decode import StaticDecoder

    dec = StaticDecoder(model, max_len=64, dtype=dtype, prepack=prepack)
    ids, tokens = torch.tensor([PROMPT]), []

    def run() -> float:
        dec.reset()
        nxt = dec.forward(ids).argmax(-1, keepdim=True)
        tokens[:] = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(NEW):
            nxt = dec.forward(nxt).argmax(-1, keepdim=True)
            tokens.append(int(nxt))
        return time.perf_counter() - t0
    return run, tokens


def quantized_ggufs(f32: Path) -> dict[str, Path]:
    import llama_cpp

    out = {"llama.cpp F32": f32}
    for name, ftype in (("BF16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16), ("F16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16),
                        ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1)):
        dst = f32.with_name(f32.stem.replace("f32", "").rstrip("-") + f"-{name.lower()}.gguf")
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, THREADS
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) != 0:
                raise SystemExit(f"llama_model_quantize failed for {name}")
        out[f"llama.cpp {name}"] = dst
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--f32", type=Path, default=None, help="SmolLM2-135M as an F32 GGUF (see above)")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python builds it); nothing measured")
        return 0
    torch.set_num_threads(THREADS)
    ggufs = quantized_ggufs(args.f32) if args.f32 else {}
    ggufs["llama.cpp Q4_1 (the kit's source file)"] = zoo.fetch_smollm2_gguf(progress=False)
    fp32, _ = zoo.load_causal_lm(progress=False)
    int8, _ = zoo.load_causal_lm(progress=False)
    quantize_(int8, Int8Config(), skip=())
    int4, _ = zoo.load_causal_lm(progress=False)
    quantize_(int4, Int4Config(group_size=128))
    quantize_(int4, Int8Config(), skip=(), filter_fn=lambda _, name: name == "lm_head")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    runs = {"kit fp32": kit_decoder(fp32, None), "kit fp32 prepacked": kit_decoder(fp32, None, prepack=True),
            "kit bf16": kit_decoder(bf16, None), "kit bf16 prepacked": kit_decoder(bf16, None, prepack=True),
            "kit int8 (head too)": kit_decoder(int8, torch.bfloat16),
            "kit int4-g128 + int8 head": kit_decoder(int4, torch.bfloat16)}
    runs.update({name: llama_cpp_decoder(path) for name, path in ggufs.items()})
    for fn, _ in runs.values():
        fn()  # warm-up
    times = measure.interleaved({k: fn for k, (fn, _) in runs.items()}, repeats=3)
    ref = runs["kit fp32"][1]
    print(f"batch 1, {THREADS} threads, {NEW} greedy tokens after a {len(PROMPT)}-token prompt")
    print("| variant | tok/s (min-max) | tokens before the first difference from kit fp32 |")
    for name, ts in times.items():
        tps = [NEW / t for t in ts]
        print(f"| {name} | {statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) | "
              f"{next((i for i, (a, b) in enumerate(zip(runs[name][1], ref)) if a != b), len(ref))}/{len(ref)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
