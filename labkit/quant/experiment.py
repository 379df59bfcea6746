"""Quantization: fp32 → bf16/fp16 → int8 → int4 / NF4 (+ double quant), GPTQ and bitsandbytes, measured.

Every SmolLM2 variant is scored on the same held-out windows; MiniLM (genuine fp32 weights) shows
ordinary quantization error; a projection shows what 8B / 70B models need.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from labkit import LabkitError, data, env, evaluate, measure, prepack, roofline, zoo
from labkit.baseline.experiment import LLMMetricsConfig
from labkit.experiments.protocol import Target, Variant, check
from labkit.quant import DtypeConfig, Int4Config, Int8Config, NF4Config, quantize_
from labkit.quant.api import bits_per_param_quantized
from labkit.quant.projection import LLAMA_3_8B, LLAMA_3_70B, project
from labkit.results import Record

NAME = "quantization"  # `labkit run quantization`
NOTEBOOK = "01d_measured_table_and_speed"

LLM_VARIANTS = (
    "fp32",
    "bf16",
    "fp16",
    "int8",
    "int8-dequantize",
    "int8-with-head",
    "int4-g128",
    "int4-g128-dequantize",
    "int4-g128-int8-head",
    "int4-g64",
    "nf4",
    "nf4-dq",
    "int4-calibrated",
    "bnb-nf4",
    "bnb-int8",
)
SWEEP_VARIANTS = ("fp32", "bf16", "int8", "int4-g128")  # decode speed by batch size: where weight-only stops paying
# also timed in labkit.decode's static loop (HF's per-step overhead removed), with the activations' dtype: bf16
# where the fused kernels compute in bf16, so no projection casts around its matmul
# the float variants are also timed in the static loop with their linears prepacked for oneDNN (labkit.prepack)
PREPACKED = ("fp32", "bf16")
STATIC_LOOP = {"fp32": None, "bf16": None, "int8": torch.bfloat16, "int8-with-head": torch.bfloat16,
               "int4-g128": torch.bfloat16, "int4-g128-int8-head": torch.bfloat16}


@dataclass
class Config(LLMMetricsConfig):
    variants: tuple[str, ...] = LLM_VARIANTS
    decode_tokens: int = 32
    repeats: int = 3
    calib_samples: int = 64
    calib_seq_len: int = 512
    gptq_group_size: int = 64
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # the batch sweep over SWEEP_VARIANTS (() = none)
    sweep_tokens: int = 8

    @classmethod
    def quick(cls) -> Config:
        return cls(ppl_window=256, ppl_stride=256, ppl_max_windows=8, decode_tokens=16, repeats=3,
                   calib_samples=32, calib_seq_len=256, batch_sizes=(1, 8, 32), sweep_tokens=4)

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(ppl_window=16, ppl_stride=16, ppl_max_windows=1, prefill_len=8, decode_prompt_len=4,
                   decode_tokens=2, repeats=1, calib_samples=2, calib_seq_len=16, batch_sizes=(1, 2), sweep_tokens=1,
                   variants=("fp32", "bf16", "fp16", "int8", "int8-dequantize", "nf4-dq", "int4-calibrated",
                             "bnb-nf4"))  # each path once


    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in LLM_VARIANTS]
        if unknown:
            raise LabkitError(f"variants={unknown} unknown; allowed: {', '.join(LLM_VARIANTS)}")
        if any(b < 1 for b in self.batch_sizes):
            raise LabkitError(f"batch_sizes={self.batch_sizes!r}: each must be a positive integer")


def variants(config: Config, device: torch.device) -> list[Variant]:
    """Every SmolLM2 variant: ``build()`` returns (model, tokenizer, extra metrics)."""

    def own(qconfig, head=None, **kw):
        """Quantize with ``qconfig``; ``head``: a second config for the tied output head alone."""
        def build():
            model, tok = zoo.load_causal_lm(config.llm, device=device, progress=False)
            report = quantize_(model, qconfig, **kw)
            if head is not None:
                for name in quantize_(model, head, skip=(), filter_fn=lambda _, name: name == "lm_head").quantized:
                    report.quantized.append(name)
                    report.skipped.pop(name, None)  # skipped by the first pass only
            extra = {"layers_quantized": len(report.quantized), "layers_skipped": sorted(report.skipped)}
            if not isinstance(qconfig, DtypeConfig):
                extra["bits_per_param_quantized"] = bits_per_param_quantized(model)
            return model, tok, extra
        return build

    def gptq():
        from labkit.quant.gptq import gptq_quantize_

        model, tok = zoo.load_causal_lm(config.llm, device=device, progress=False)
        calib = data.calibration_batches(tok, n=config.calib_samples, seq_len=config.calib_seq_len, device=device)
        gptq_quantize_(model, calib, group_size=config.gptq_group_size, progress=False)
        return model, tok, {"method": "gptq", "group_size": config.gptq_group_size,
                            "bits_per_param_quantized": bits_per_param_quantized(model)}

    def bnb(mode):
        def build():
            from labkit.quant.bnb import load_causal_lm_bnb

            model, tok = load_causal_lm_bnb(config.llm, mode, device=str(device))
            # bitsandbytes' CPU backend repacks 4-bit weights on the first forward and replaces the
            # double-quantized absmax by bf16 values, so a model holds more bytes once it has run:
            # weight_bytes (measured after evaluation) is what it holds while serving; this is as loaded.
            return model, tok, {"bits_per_param_quantized": bits_per_param_quantized(model),
                                "weight_bytes_as_loaded": measure.weight_bytes(model),
                                "method": f"bitsandbytes {env.lib_version('bitsandbytes')}"}
        return build

    def plain():
        model, tok = zoo.load_causal_lm(config.llm, device=device, progress=False)
        return model, tok, {}

    g = config.gptq_group_size
    return [Variant("fp32", plain, "the checkpoint as stored"),
            Variant("bf16", own(DtypeConfig(torch.bfloat16), skip=()), "every weight cast to bfloat16"),
            Variant("fp16", own(DtypeConfig(torch.float16), skip=()), "every weight cast to float16"),
            Variant("int8", own(Int8Config()), "int8 weights, one scale per output row; torch's fused int8 matmul",
                    {"bits": 8, "kernel": "fused"}),
            Variant("int8-dequantize", own(Int8Config(kernel="dequantize")),
                    "the same int8 layer on the readable path: dequantize, then an fp32 matmul",
                    {"bits": 8, "kernel": "dequantize"}),
            Variant("int8-with-head", own(Int8Config(), skip=()),
                    "int8 for every Linear, the tied output head too (a new int8 copy; the fp32 table stays for "
                    "lookups): a step reads 85 MB less", {"bits": 8, "kernel": "fused", "lm_head": "int8"}),
            Variant("int4-g128", own(Int4Config(group_size=128)), "int4 round-to-nearest; torch's fused int4 matmul",
                    {"group_size": 128, "kernel": "fused"}),
            Variant("int4-g128-dequantize", own(Int4Config(group_size=128, kernel="dequantize")),
                    "the same int4 layer on the readable path", {"group_size": 128, "kernel": "dequantize"}),
            Variant("int4-g128-int8-head", own(Int4Config(group_size=128), head=Int8Config()),
                    "int4 g128 for every layer's Linear, the tied output head in int8 (a new copy): the fp32 head is "
                    "113 of the 174 MB an int4-g128 step reads. llama.cpp's Q4_1 file of this model is laid out the "
                    "same way (Q4_1 blocks, its tied token_embd in Q8_0)",
                    {"group_size": 128, "kernel": "fused", "lm_head": "int8"}),
            Variant("int4-g64", own(Int4Config(group_size=g)), "int4 round-to-nearest", {"group_size": g}),
            Variant("nf4", own(NF4Config(64, double_quant=False)), "NF4 codes, fp32 absmax", {"group_size": 64}),
            Variant("nf4-dq", own(NF4Config(64, double_quant=True)), "NF4, absmax quantized again",
                    {"group_size": 64, "double_quant": True}),
            Variant("int4-calibrated", gptq, "GPTQ int4 on calibration text", {"group_size": g}),
            Variant("bnb-nf4", bnb("nf4"), "bitsandbytes Linear4bit (NF4)"),
            Variant("bnb-int8", bnb("int8"), "bitsandbytes Linear8bitLt (LLM.int8)")]


def _unavailable(name: str, device: torch.device) -> str | None:
    if name == "fp16" and device.type != "cuda":
        return "fp16 matmuls are emulated slowly on this CPU; measured on GPUs only"
    if name.startswith("bnb") and env.bnb_backend() is None:
        return "bitsandbytes missing or without a backend for this device"
    return None


def run(config: Config | None = None, progress: bool = True) -> Record:
    """Build every variant and score it (untimed), then time decode for all of them in rotated rounds."""
    config = config or Config()
    device = env.resolve_device(config.device)
    rec = Record("quantization", env=env.describe())
    builders = {v.name: v.build for v in variants(config, device)}
    models, skipped = {}, {}
    fp32_ppl = None
    for name in tqdm(config.variants, desc="quantization variants", disable=not progress):
        why = _unavailable(name, device)
        if why:
            skipped[name] = why
            continue
        try:
            model, tok, extra = builders[name]()
        except (ImportError, RuntimeError, OSError) as exc:
            if not name.startswith("bnb"):
                raise
            # bitsandbytes is installed but its backend failed to load for this device (e.g. a CUDA mismatch): the
            # variants already built stay, the row says why it is missing
            skipped[name] = f"bitsandbytes failed on {device}: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        with measure.track_peak_memory(device) as pm:  # runtime memory of the forward, beyond the weights
            ppl = evaluate.perplexity(model, tok, window=config.ppl_window, stride=config.ppl_stride,
                                      max_windows=config.ppl_max_windows)
        fp32_ppl = ppl if name == "fp32" else fp32_ppl
        rec.add(name, model=config.llm, params=measure.param_count(model),
                weight_bytes=measure.weight_bytes(model),  # after evaluation: what the model holds while it runs
                perplexity=ppl, peak_memory_bytes=pm.peak_bytes, peak_memory_kind=pm.kind,
                dtype=env.dtype_name(measure.compute_dtype(model)),
                **({"perplexity_ratio": ppl / fp32_ppl} if fp32_ppl else {}), **extra)
        models[name] = model
    ceilings = _time_decode(rec, models, config, progress)
    _batch_sweep(rec, models, config, progress)
    models.clear()
    gc.collect()
    _encoder_variants(rec, config, device)
    for shape in (LLAMA_3_8B, LLAMA_3_70B):
        for row in project(shape):
            rec.add(row.pop("name"), **row)
    rec.config = {**asdict(config), "skipped": skipped,
                  "decode_timing": f"{config.decode_tokens} cached greedy decode steps after a "
                                   f"{config.decode_prompt_len}-token prompt, prefill excluded; one untimed warm-up "
                                   f"each, then {config.repeats} rounds over all variants in rotated order; median, "
                                   "IQR, min, max; speedup = ratio of medians vs fp32",
                  "ceilings": ceilings,
                  "bandwidth_ceiling": "bandwidth_ceiling_tok_s = measured read bandwidth / bytes_read_per_token "
                                       "(every weight a step reads, packed where quantized; embedding lookups "
                                       "excluded, a tied output head included)",
                  "calibration_vs_evaluation": "GPTQ calibrates on the 'calibration' split and perplexity is scored "
                                               "on the 'evaluation' split of the same corpus (pydoc_data.topics, "
                                               "split by topic name: disjoint text, same style)",
                  "provenance_note": zoo.MODELS[config.llm].notes}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def _time_decode(rec: Record, models: dict, config: Config, progress: bool) -> dict | None:
    """Batch-1 decode of every variant, rotated; each row also gets its bandwidth ceiling and how near it came."""
    if not models:
        return None
    timing = dict(prompt_len=config.decode_prompt_len, new_tokens=config.decode_tokens)
    fns = {name: measure.decode_step_times(m, **timing) for name, m in models.items()}
    fns.update({("static", name): measure.decode_step_times(models[name], loop="static", dtype=dt, **timing)
                for name, dt in STATIC_LOOP.items() if name in models})
    if prepack.available() and measure.model_device(next(iter(models.values()))).type == "cpu":
        fns.update({("prepacked", name): measure.decode_step_times(models[name], loop="static", prepack=True,
                                                                   **timing)
                    for name in PREPACKED if name in models})
    for fn in fns.values():  # warm-up, untimed
        fn()
    bar = tqdm(total=config.repeats * len(fns), desc="decode timing (rotated)", disable=not progress)
    times = measure.interleaved(fns, config.repeats, progress=lambda n, r: bar.update(1))
    bar.close()
    packed = {name[1]: times.pop(name) for name in list(times) if isinstance(name, tuple) and name[0] == "prepacked"}
    for name, ts in packed.items():  # the static loop with its float linears prepacked (labkit.prepack)
        tps = measure.spread([config.decode_tokens / t for t in ts])
        rec.variant(name, config.llm).update(static_prepacked_tokens_per_s=tps["median"],
                                             static_prepacked_tokens_per_s_min=tps["min"],
                                             static_prepacked_tokens_per_s_max=tps["max"])
    static = {name[1]: times.pop(name) for name in list(times) if isinstance(name, tuple)}
    for name, ts in static.items():
        tps = measure.spread([config.decode_tokens / t for t in ts])
        rec.variant(name, config.llm).update(static_tokens_per_s=tps["median"], static_tokens_per_s_min=tps["min"],
                                             static_tokens_per_s_max=tps["max"])
    if "fp32" in static:
        rows = {name: rec.variant(name, config.llm) for name in static}
        for name, x in measure.speedups(rows, "fp32", "static_tokens_per_s", higher_is_better=True).items():
            rows[name]["static_speedup_vs_fp32"] = x
        base = rows["fp32"]["static_tokens_per_s"]  # the plain static loop in fp32: what packing is measured against
        for name in packed:
            row = rec.variant(name, config.llm)
            row["static_prepacked_speedup_vs_fp32"] = row["static_prepacked_tokens_per_s"] / base
    for name, ts in times.items():
        tps = measure.spread([config.decode_tokens / t for t in ts])
        row = rec.variant(name, config.llm)
        row.update(tokens_per_s=tps["median"], tokens_per_s_iqr=tps["iqr"], tokens_per_s_min=tps["min"],
                   tokens_per_s_max=tps["max"], latency_ms_median=1e3 * statistics.median(ts) / config.decode_tokens,
                   latency_ms_iqr=1e3 * measure.iqr(ts) / config.decode_tokens, decode_repeats=len(ts))
    if "fp32" in times:
        rows = {name: rec.variant(name, config.llm) for name in times}
        for name, x in measure.speedups(rows, "fp32").items():
            rows[name]["speedup_vs_baseline"] = x
    ceil = roofline.ceilings(str(measure.model_device(next(iter(models.values())))))
    for name, model in models.items():
        row, per_token = rec.variant(name, config.llm), roofline.decode_bytes_per_token(model)
        ceiling = ceil.bandwidth_bytes_per_s / per_token
        row.update(bytes_read_per_token=per_token, bandwidth_ceiling_tok_s=ceiling,
                   pct_of_bandwidth_ceiling=100 * row["tokens_per_s"] / ceiling)
        if "static_tokens_per_s" in row:
            row["static_pct_of_bandwidth_ceiling"] = 100 * row["static_tokens_per_s"] / ceiling
    return ceil.as_dict()


def _batch_sweep(rec: Record, models: dict, config: Config, progress: bool) -> None:
    """Decode tokens/s at each batch size for fp32/bf16/int8/int4, rotated over every (variant, batch): a batch of
    B reads each weight once for B tokens, so weight-only quantization's edge shrinks as B grows."""
    names = [n for n in SWEEP_VARIANTS if n in models]
    if not names or not config.batch_sizes:
        return
    fns = {(n, b): measure.decode_step_times(models[n], batch=b, prompt_len=config.decode_prompt_len,
                                             new_tokens=config.sweep_tokens)
           for n in names for b in config.batch_sizes}
    for fn in fns.values():  # warm-up, untimed
        fn()
    bar = tqdm(total=config.repeats * len(fns), desc="decode by batch (rotated)", disable=not progress)
    times = measure.interleaved(fns, config.repeats, progress=lambda n, r: bar.update(1))
    bar.close()
    rows = {}
    for (name, b), ts in times.items():
        sp = measure.spread([b * config.sweep_tokens / t for t in ts])
        rows[name, b] = rec.add(f"{name} batch {b}", model=f"{config.llm} by batch", variant=name, batch=b,
                                dtype=env.dtype_name(measure.compute_dtype(models[name])),
                                decode_tok_s=sp["median"], decode_tok_s_min=sp["min"], decode_tok_s_max=sp["max"],
                                decode_repeats=len(ts))
    for (_, b), row in rows.items():
        if ("fp32", b) in rows:
            row["x_fp32_same_batch"] = row["decode_tok_s"] / rows["fp32", b]["decode_tok_s"]


def _metric(name: str, which: str, metric: str):
    def value(rec: Record) -> float | None:
        row = rec.variant(name, rec.config[which])
        if metric == "weight_bytes_ratio":
            return row["weight_bytes"] / rec.variant("fp32", rec.config["llm"])["weight_bytes"]
        if metric == "perplexity_change_vs_dequantize":  # the fused kernel computes the same model
            return abs(row["perplexity"] / rec.variant(f"{name}-dequantize", rec.config[which])["perplexity"] - 1)
        if metric.endswith(("speedup_vs_baseline", "speedup_vs_fp32")) and rec.env.get("device") != "cpu":
            return None  # the speed targets are the CPU kernels'; on a GPU these layers take the readable path
        return row.get(metric)
    return value


TARGETS = [Target(f"{{{which}}}/{name}/{metric}", _metric(name, which, metric), limit, kind)
           for name, which, metric, limit, kind in (
               ("nf4-dq", "llm", "bits_per_param_quantized", 4.2, "max"),
               ("nf4-dq", "llm", "weight_bytes_ratio", 0.33, "max"),
               ("int4-calibrated", "llm", "perplexity_ratio", 1.15, "max"),
               ("int4-calibrated", "llm", "bits_per_param_quantized", 4.6, "max"),
               ("int8", "llm", "perplexity_ratio", 1.01, "max"),
               ("int8", "llm", "speedup_vs_baseline", 1.5, "min"),
               ("int4-g128", "llm", "speedup_vs_baseline", 1.8, "min"),
               ("int8", "llm", "static_speedup_vs_fp32", 1.5, "min"),  # the kit's own loop, fp32 in it too
               ("int4-g128", "llm", "static_speedup_vs_fp32", 1.8, "min"),
               ("bf16", "llm", "static_prepacked_speedup_vs_fp32", 1.2, "min"),  # bf16's gain at batch 1, packed
               ("int8", "llm", "perplexity_change_vs_dequantize", 0.001, "max"),
               ("int4-g128", "llm", "perplexity_change_vs_dequantize", 0.001, "max"),
               ("nf4", "llm", "perplexity_ratio", 1.35, "max"),
               ("int8", "encoder", "cosine_to_reference", 0.99, "min"))]


def figures(rec: Record) -> list:
    """Memory against perplexity, one chart per model that has perplexity; decode speed by batch size."""
    from labkit.viz.plots import batch_crossover, models_of, scatter

    figs = [scatter(rec, "weight_bytes", "perplexity", model=m) for m in sorted(models_of(rec, "perplexity"))]
    crossover = batch_crossover(rec)
    return figs + ([crossover] if crossover else [])


def _encoder_variants(rec: Record, config: Config, device: torch.device) -> None:
    sents = data.sentences()
    ref = None
    for name, qconfig in (("fp32", None), ("int8", Int8Config()), ("nf4", NF4Config(64, double_quant=False))):
        enc, tok = zoo.load_encoder(config.encoder, device=device)
        extra = {}
        if qconfig is not None:
            quantize_(enc, qconfig)
            extra["bits_per_param_quantized"] = bits_per_param_quantized(enc)
        emb = evaluate.embed(enc, evaluate.encode_sentences(tok, sents, device))
        ref = emb if ref is None else ref
        rec.add(name, model=config.encoder, params=measure.param_count(enc), weight_bytes=measure.weight_bytes(enc),
                cosine_to_reference=evaluate.cosine(emb, ref), dtype=env.dtype_name(measure.compute_dtype(enc)),
                **extra)
