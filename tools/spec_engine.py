"""Speculation inside the paged engine against the plain engine, batched, on SmolLM2-135M.

    python tools/spec_engine.py     (a few minutes on 2 cores; README's engine speculation line came from this)

Three engines: plain, n-gram lookup (k = 4) and the speculative experiment's draft model (SmolLM2 with 10 of its 30
layers, untrained; k = 4). Two workloads: ``copy`` (8 requests, each asked to repeat a different passage it was
shown: prompt lookup pays)
and serving's quick workload (24 requests, prompts cut from text, nothing to copy). Both engines are warmed up,
then timed in 3 rotated rounds (:func:`labkit.measure.compare_latency`); greedy, so the tokens must be identical.
"""

from __future__ import annotations

import torch

from labkit import measure, zoo
from labkit.distill import layer_dropped_lm
from labkit.serve import LLM, SamplingParams
from labkit.serve.bench import make_workload
from labkit.serve.experiment_speculative import Config, copy_requests

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def serve(llm: LLM, prompts, params, outs: dict, key: str):
    """One timed call: serve the whole workload, keep its tokens under ``outs[key]``."""
    return lambda: outs.__setitem__(key, [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])


def main() -> None:
    torch.set_num_threads(2)
    model, tok = zoo.load_causal_lm(progress=False)
    draft = layer_dropped_lm(model, keep=list(Config().draft_keep))  # the speculative experiment's untrained draft
    draft_spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 4}
    loads = {"copy": (copy_requests(tok, 8), [48] * 8), "serving-quick": make_workload(tok, 24, (16, 160), (8, 64), 0)}
    for name, (prompts, max_tokens) in loads.items():
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        engines = {"plain": LLM(model, tok, block_size=16, max_model_len=384, max_num_seqs=24),
                   "ngram-k4": LLM(model, tok, block_size=16, max_model_len=384, max_num_seqs=24,
                                   speculative_config=NGRAM),
                   f"draft-{len(Config().draft_keep)}L-k4": LLM(model, tok, block_size=16, max_model_len=384,
                                                              max_num_seqs=24, speculative_config=draft_spec)}
        outs: dict[str, list[list[int]]] = {}
        rows = measure.compare_latency({k: serve(engines[k], prompts, params, outs, k) for k in engines}, repeats=3,
                                       baseline="plain")
        n = sum(max_tokens)
        same = all(o == outs["plain"] for o in outs.values())
        print(f"{name}: {len(prompts)} requests, {n} output tokens; every engine's tokens identical: {same}")
        for k, r in rows.items():
            st = engines[k].stats
            runs = [round(n / (t / 1e3), 1) for t in r["latency_ms_runs"]]
            print(f"  {k}: {n / (r['latency_ms_median'] / 1e3):.1f} tok/s (runs {runs}), speed-up "
                  f"{r['speedup_vs_baseline']:.2f}x, steps/run {st.steps // 4}, accepted "
                  f"{st.spec_accepted}/{st.spec_proposed} ({st.acceptance_rate:.0%})")


if __name__ == "__main__":
    main()
