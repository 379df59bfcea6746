"""The first knob: the same model in fp32 and in a 16-bit float, timed in rotated rounds, with what it costs.

On a CPU with AMX or AVX512-BF16 (and a GPU of compute capability 8.0+), bf16 matrix products run in hardware:
twice the values a cycle of fp32, and half the bytes read from memory. Where bf16 is not native, torch converts it
to fp32 and back around every product, which is slower than fp32 itself. These functions measure both sides on the
kit's models: speed as a ratio of medians of rotated rounds, quality as the perplexity ratio and the greedy tokens
that agree with fp32 (SmolLM2) or the cosine to fp32's embeddings (MiniLM).
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labkit import data, env, evaluate, measure


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype`` (the original stays as it is: it is the fp32 reference)."""
    return copy.deepcopy(model).to(dtype)


def _decode_seconds(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each decode timer (each call returns the seconds of its decode steps alone): one warm-up
    call each, then rotated rounds."""
    for fn in fns.values():
        fn()
    return {name: statistics.median(times) for name, times in measure.interleaved(fns, repeats).items()}


@torch.no_grad()
def compare_llm(model: nn.Module, tok, config, fp32_perplexity: float, dtype: torch.dtype = torch.bfloat16,
                prompts: int = 4, new_tokens: int = 24) -> dict[str, Any]:
    """SmolLM2 in ``dtype`` against ``model`` (fp32): a record row. Prefill (``config.prefill_len`` tokens) and
    cached decode (``config.decode_tokens`` steps) are each timed for both in rotated rounds."""
    low = cast(model, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, config.prefill_len),
                        generator=torch.Generator().manual_seed(0)).to(measure.model_device(model))
    def prefill(net: nn.Module):
        return lambda: net(input_ids=ids, use_cache=False, logits_to_keep=1)

    pre = measure.compare_latency({"fp32": prefill(model), "low": prefill(low)}, repeats=config.repeats,
                                  baseline="fp32")
    timing = dict(prompt_len=config.decode_prompt_len, new_tokens=config.decode_tokens)
    dec = _decode_seconds({"fp32": measure.decode_step_times(model, **timing),
                           "low": measure.decode_step_times(low, **timing)}, config.repeats)
    ppl = evaluate.perplexity(low, tok, window=config.ppl_window, stride=config.ppl_stride,
                              max_windows=config.ppl_max_windows)
    from labkit.serve.baselines import hf_sequential  # greedy HF generate, one prompt at a time, EOS ignored

    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in data.sentences()[:prompts]]
    agree = evaluate.token_agreement(hf_sequential(low, texts, [new_tokens] * prompts).token_ids,
                                     hf_sequential(model, texts, [new_tokens] * prompts).token_ids)
    return dict(dtype=env.dtype_name(dtype), params=measure.param_count(low), weight_bytes=measure.weight_bytes(low),
                perplexity=ppl, perplexity_ratio=ppl / fp32_perplexity,
                prefill_tokens_per_s=config.prefill_len * 1e3 / pre["low"]["latency_ms_median"],
                prefill_speedup_vs_fp32=pre["low"]["speedup_vs_baseline"],
                tokens_per_s=config.decode_tokens / dec["low"],
                latency_ms_median=dec["low"] * 1e3 / config.decode_tokens,
                decode_speedup_vs_fp32=dec["fp32"] / dec["low"],
                greedy_token_agreement=agree, greedy_prompts=prompts, greedy_new_tokens=new_tokens,
                notes=f"a copy cast to {env.dtype_name(dtype)}; speed-ups are ratios of medians of "
                      f"{config.repeats} rotated rounds against fp32 in this run; {env.bf16_note()}")


def compare_encoder(enc: nn.Module, batch: dict, repeats: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """MiniLM in ``dtype`` against ``enc`` (fp32) on one tokenised batch: latency in rotated rounds, and the
    cosine of its embeddings to fp32's."""
    low = cast(enc, dtype)
    t = measure.compare_latency({"fp32": lambda: evaluate.embed(enc, batch), "low": lambda: evaluate.embed(low, batch)},
                                repeats=repeats, baseline="fp32")
    n_tokens = int(batch["attention_mask"].sum())
    return dict(dtype=env.dtype_name(dtype), params=measure.param_count(low), weight_bytes=measure.weight_bytes(low),
                latency_ms_median=t["low"]["latency_ms_median"],
                tokens_per_s=n_tokens * 1e3 / t["low"]["latency_ms_median"],
                speedup_vs_fp32=t["low"]["speedup_vs_baseline"],
                cosine_to_fp32=evaluate.cosine(evaluate.embed(low, batch), evaluate.embed(enc, batch)),
                notes=f"a copy cast to {env.dtype_name(dtype)}; speed-up: ratio of medians of {repeats} rotated "
                      f"rounds against fp32 in this run; {env.bf16_note()}")


def linear_speeds(layer: nn.Linear, rows: tuple[int, ...] = (1, 64), repeats: int = 5) -> list[dict[str, Any]]:
    """One projection of the model (``layer``, fp32) timed at each number of input ``rows`` (1: a decode step of
    one sequence; 64: a prefill chunk or a batch) in fp32 and bf16, plain and with the weight prepacked once
    (:mod:`labkit.prepack`; CPU only). Every (rows, variant) pair in the same rotated rounds; microseconds a call
    (the mean of 20 back-to-back calls, median over rounds) and the speed-up over fp32 plain at the same rows."""
    from labkit import prepack

    weights = {"float32": layer, "bfloat16": cast(layer, torch.bfloat16)}
    fns, dev = {}, layer.weight.device
    for n in rows:
        for dtype, lin in weights.items():
            x = torch.randn(n, layer.in_features, generator=torch.Generator().manual_seed(n)).to(dev, lin.weight.dtype)
            fns[n, dtype, "plain"] = lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias)
            if dev.type == "cpu" and prepack.available():
                fns[n, dtype, "prepacked"] = lambda x=x, p=prepack.PackedLinear(lin): p(x)
    with torch.no_grad():
        lat = measure.compare_latency(fns, repeats=repeats, inner=20, device=dev)
    out = []
    for (n, dtype, layout), t in lat.items():
        base = lat[n, "float32", "plain"]["latency_ms_median"]
        out.append(dict(rows=n, dtype=dtype, weights=layout, microseconds=t["latency_ms_median"] * 1e3,
                        speedup_vs_fp32_plain=base / t["latency_ms_median"]))
    return out


def pace(speedup: float, against: str | None = None) -> str:
    """A speed-up as words: ``2.06`` -> "2.06x as fast", ``0.57`` -> "1.75x slower"; with ``against="fp32"``,
    "2.06x as fast as fp32" and "1.75x slower than fp32"."""
    if speedup >= 1:
        return f"{speedup:.2f}x as fast" + (f" as {against}" if against else "")
    return f"{1 / speedup:.2f}x slower" + (f" than {against}" if against else "")


def speed_sentence(row: dict[str, Any], what: str = "decode") -> str:
    """One sentence from a row of :func:`compare_llm`: how much faster (or slower) the 16-bit copy ran."""
    return f"{what} in {row['dtype']} ran {pace(row[f'{what}_speedup_vs_fp32'], 'fp32')} here"
