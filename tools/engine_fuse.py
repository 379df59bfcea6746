"""The paged engine with q/k/v and gate/up stacked into one matmul each, against the same engine without stacking.

    python tools/engine_fuse.py     (about 2 minutes on 2 cores)

Serving's quick workload (24 requests, greedy), both engines built and warmed up first, then 3 rotated rounds
(:func:`labkit.measure.compare_latency`); the tokens must be identical.
"""

from __future__ import annotations

import torch

from labkit import measure, zoo
from labkit.serve import LLM, SamplingParams
from labkit.serve.bench import make_workload


def main() -> None:
    torch.set_num_threads(2)
    model, tok = zoo.load_causal_lm(progress=False)
    prompts, max_tokens = make_workload(tok, 24, (16, 160), (8, 64), 0)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    engines = {k: LLM(model, tok, block_size=16, max_model_len=384, max_num_seqs=24,
                      stack_projections=(k == "stacked")) for k in ("stacked", "separate")}
    outs: dict[str, list[list[int]]] = {}

    def serve(key: str):
        return lambda: outs.__setitem__(key, [o.token_ids for o in engines[key].generate(
            prompts, params, use_tqdm=False)])

    rows = measure.compare_latency({k: serve(k) for k in engines}, repeats=3, baseline="separate")
    n = sum(max_tokens)
    print(f"tokens identical: {outs['stacked'] == outs['separate']}")
    for k, r in rows.items():
        runs = [round(n / (t / 1e3), 1) for t in r["latency_ms_runs"]]
        print(f"{k}: {n / (r['latency_ms_median'] / 1e3):.1f} tok/s (runs {runs}), {r['speedup_vs_baseline']:.2f}x")


if __name__ == "__main__":
    main()
