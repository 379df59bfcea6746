"""Baseline: the unmodified fp32 models every later technique is compared against."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from labkit import env, evaluate, measure, zoo
from labkit.baseline import dtype
from labkit.data import sentences
from labkit.experiments.protocol import Target, check
from labkit.results import Record

NAME = "baseline"  # `labkit run baseline`
NOTEBOOK = "00_setup_and_baselines"


@dataclass
class LLMMetricsConfig:
    """The settings :func:`llm_metrics` reads; experiments that measure an LLM extend this."""

    llm: str = "smollm2-135m"
    encoder: str = "minilm-l6"
    ppl_window: int = 512
    ppl_stride: int = 256
    ppl_max_windows: int | None = None
    prefill_len: int = 128
    decode_prompt_len: int = 32
    decode_tokens: int = 64
    repeats: int = 5
    device: str = env.device_field()


@dataclass
class Config(LLMMetricsConfig):
    """Baseline sizes: the full run scores every held-out window."""

    @classmethod
    def quick(cls) -> Config:
        return cls(ppl_window=256, ppl_stride=256, ppl_max_windows=8, decode_tokens=16, repeats=3)

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(ppl_window=16, ppl_stride=16, ppl_max_windows=1, prefill_len=8, decode_prompt_len=4,
                   decode_tokens=2, repeats=1)


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    torch.manual_seed(0)
    rec = Record("baseline", config=asdict(config), env=env.describe())
    device = env.resolve_device(config.device)
    model, tok = zoo.load_causal_lm(config.llm, device=device, progress=progress)
    fp32 = llm_metrics(model, tok, config, progress=progress)
    rec.add("fp32", **fp32, dtype="float32", model=config.llm, provenance=model.labkit_card.source)
    native = env.bf16_native(device)  # emulated bf16 is slower than fp32: no row a learner would choose
    if native:
        rec.add("bf16", **dtype.compare_llm(model, tok, config, fp32["perplexity"]), model=config.llm,
                provenance=model.labkit_card.source)
    del model

    enc, etok = zoo.load_encoder(config.encoder, device=device)
    sents = sentences()
    batch = evaluate.encode_sentences(etok, sents, device)  # tokenised once: the timing is the model's alone
    n_tokens = int(batch["attention_mask"].sum())
    t = measure.benchmark(lambda: evaluate.embed(enc, batch), repeats=config.repeats * 2, device=device)
    rec.add("fp32", model=config.encoder, params=measure.param_count(enc), weight_bytes=measure.weight_bytes(enc),
            latency_ms_median=t.median_ms, latency_ms_iqr=t.iqr_ms, tokens_per_s=n_tokens / t.median_s,
            batch_sentences=len(sents), dtype="float32", provenance=enc.labkit_card.source)
    if native:
        rec.add("bf16", **dtype.compare_encoder(enc, batch, config.repeats * 2), model=config.encoder,
                batch_sentences=len(sents), provenance=enc.labkit_card.source)
    auto, why = env.auto_dtype(device)
    rec.config.update(auto_dtype=env.dtype_name(auto), auto_dtype_why=why)
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def _fp32_bytes_per_param(rec: Record, which: str) -> float:
    row = rec.variant("fp32", rec.config[which])
    return row["weight_bytes"] / row["params"]


# The baselines every later lesson divides by: the offline weights load whole and as fp32, and SmolLM2 predicts
# held-out text as a trained model does (a broken load or a wrong tokenizer gives perplexity in the thousands)
TARGETS = [
    Target("{llm} fp32 bytes held per parameter", lambda r: _fp32_bytes_per_param(r, "llm"), 4.01, "max"),
    Target("{encoder} fp32 bytes held per parameter", lambda r: _fp32_bytes_per_param(r, "encoder"), 4.01, "max"),
    Target("{llm} fp32 held-out perplexity", lambda r: r.variant("fp32", r.config["llm"])["perplexity"], 30.0, "max"),
    # where bf16 is native (no row elsewhere: not measured) its matrix products must pay, and cost little. Batch-1
    # decode is left without a target: it multiplies a vector by each weight matrix, and lesson 00 shows why the
    # hardware's bf16 tiles do not always win there
    Target("{llm} bf16 prefill speed-up over fp32 (native bf16)",
           lambda r: r.variant("bf16", r.config["llm"])["prefill_speedup_vs_fp32"], 1.3),
    Target("{llm} bf16 perplexity / fp32", lambda r: r.variant("bf16", r.config["llm"])["perplexity_ratio"], 1.02,
           "max"),
    Target("{encoder} bf16 speed-up over fp32 (native bf16)",
           lambda r: r.variant("bf16", r.config["encoder"])["speedup_vs_fp32"], 1.3),
    Target("{encoder} bf16 cosine to fp32", lambda r: r.variant("bf16", r.config["encoder"])["cosine_to_fp32"], 0.99),
]


def figures(rec: Record) -> list:
    """The weights every later lesson shrinks, both models on one axis (bytes compare across models; SmolLM2's
    decode tok/s and MiniLM's encode tok/s do not, so speed stays in the table)."""
    from labkit.viz.plots import metric_bars

    return [metric_bars(rec, "weight_bytes", title="baseline: fp32 weight memory, the number later lessons shrink")]


def llm_metrics(model: torch.nn.Module, tok, config: LLMMetricsConfig, progress: bool = False) -> dict:
    """The shared LLM metrics (size, perplexity, prefill and decode speed) later experiments reuse."""
    ppl = evaluate.perplexity(model, tok, window=config.ppl_window, stride=config.ppl_stride,
                              max_windows=config.ppl_max_windows, progress=progress)
    pre, pre_t = measure.prefill_tokens_per_s(model, seq_len=config.prefill_len, repeats=config.repeats)
    dec, dec_t = measure.decode_tokens_per_s(model, prompt_len=config.decode_prompt_len,
                                             new_tokens=config.decode_tokens, repeats=config.repeats)  # no prefill
    return dict(params=measure.param_count(model), weight_bytes=measure.weight_bytes(model), perplexity=ppl,
                prefill_tokens_per_s=pre, prefill_ms_iqr=pre_t.iqr_ms,
                tokens_per_s=dec, latency_ms_median=dec_t.median_ms / config.decode_tokens,
                latency_ms_iqr=dec_t.iqr_ms / config.decode_tokens)
