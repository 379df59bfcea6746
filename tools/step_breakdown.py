"""Where the paged engine's step time goes, on serving's quick workload and on long contexts.

    python tools/step_breakdown.py     (about 2 minutes on 2 cores)

Two workloads, greedy, EOS ignored, one warmed-up engine each: serving's quick workload (24 requests, prompts
16-160 tokens, outputs 8-64) and a long-context one (32 requests of 300-token prompts, 40 tokens each), where the
per-layer gather copies the most. Prints :func:`labkit.serve.profile.step_breakdown` for each, and the ceiling the
matmul share puts on any change outside the matmuls.
"""

from __future__ import annotations

import torch

from labkit import zoo
from labkit.serve import LLM, SamplingParams
from labkit.serve.bench import make_workload
from labkit.serve.profile import GATHER, step_breakdown


def show(name: str, bd: dict) -> None:
    ph, ops, win = bd["phases"], bd["ops"], bd["window"]
    step = sum(ph.values())
    print(f"\n{name}: {step:.1f} ms a step over the run; phases " +
          ", ".join(f"{k} {v:.2f} ms ({v / step:.1%})" for k, v in ph.items()))
    print(f"  profiled window: {win['steps']} steps, {win['plain']:.1f} ms a step unprofiled, {win['profiled']:.1f} "
          "profiled; " + ", ".join(f"{k} {v:.1f} ms ({v / win['profiled']:.0%})" for k, v in ops.items()))
    print(f"  matmuls are {ops['matmul'] / win['plain']:.0%} of an unprofiled step: at most "
          f"{win['plain'] / ops['matmul']:.2f}x from everything else; the gather copy is "
          f"{ops[GATHER] / win['plain']:.0%}")


def main() -> None:
    torch.set_num_threads(2)
    model, tok = zoo.load_causal_lm(progress=False)
    prompts, max_tokens = make_workload(tok, 24, (16, 160), (8, 64), 0)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    llm = LLM(model, tok, block_size=16, max_model_len=384, max_num_seqs=24)
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    show("serving quick workload (24 requests)", step_breakdown(llm, prompts, params))

    g = torch.Generator().manual_seed(0)
    long_prompts = [torch.randint(100, 20000, (300,), generator=g).tolist() for _ in range(32)]
    long_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(model, tok, block_size=16, max_model_len=512, max_num_seqs=32)
    llm.generate(long_prompts[:2], long_params, use_tqdm=False)
    show("long contexts (32 x 300-token prompts, 40 out)", step_breakdown(llm, long_prompts, long_params, steps=4))


if __name__ == "__main__":
    main()
