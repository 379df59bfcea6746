"""The int8 KV cache against the model-dtype cache on serving's quick workload: bytes a token, greedy agreement, speed.

    python tools/kv_int8.py     (about a minute on 2 cores; README's int8 KV paragraph came from this)

Both engines are built and warmed up first, then each serves the workload 3 times in alternating order; the
speed is output tokens over the median wall time.
"""

from __future__ import annotations

import statistics
import time

import torch

from labkit import zoo
from labkit.serve import LLM, SamplingParams
from labkit.serve.bench import make_workload


def main() -> None:
    torch.set_num_threads(2)
    model, tok = zoo.load_causal_lm(progress=False)
    prompts, max_tokens = make_workload(tok, 24, (16, 160), (8, 64), 0)  # serving's quick workload
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    engines = {d: LLM(model, tok, block_size=16, max_model_len=224, max_num_seqs=24, kv_cache_dtype=d)
               for d in ("auto", "int8")}
    for llm in engines.values():
        llm.generate(prompts[:4], params[:4], use_tqdm=False)
    outs: dict[str, list[list[int]]] = {}
    times: dict[str, list[float]] = {d: [] for d in engines}
    for r in range(3):
        for d in list(engines)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            done = engines[d].generate(prompts, params, use_tqdm=False)
            times[d].append(time.perf_counter() - t0)
            outs[d] = [o.token_ids for o in done]
    n = sum(max_tokens)
    for d, llm in engines.items():
        kv, bm = llm.engine.kv, llm.engine.bm
        print(f"{d}: {n / statistics.median(times[d]):.1f} tok/s (runs {[round(n / t, 1) for t in times[d]]}), "
              f"{kv.nbytes / len(bm.blocks) / bm.block_size:,.0f} KV bytes a token")
    ref, q = outs["auto"], outs["int8"]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, q)]
    print(f"requests token-identical: {sum(p == len(a) for p, a in zip(prefix, ref))} of {len(ref)}; tokens before "
          f"each request's first difference: {sum(prefix)} of {n}")


if __name__ == "__main__":
    main()
