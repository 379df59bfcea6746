"""Capstone: compose the techniques in sequence and measure after every stage.

``digits-cnn``: teacher → distilled student (half width, soft targets on the training images) → structured prune
(30 % of channels, Taylor) + KD fine-tune → ONNX Runtime fp32 → ORT static INT8. ``smollm2-135m``: dense →
structured MLP prune (30 %) + KD recovery → INT8 / NF4 (and GPTQ in full mode) weights, or bf16 where the device
multiplies it natively → served by the paged engine.
Every stage records its quality, ``params``, ``weight_bytes``, ``latency_ms_median`` (timed together in rotated
rounds, same inputs) and for the LLM serving throughput; each carries ``stage``, ``recipe`` and
``on_pareto_front`` (memory vs quality and latency vs quality within its model). ``labkit.select`` then answers
"the smallest / fastest variant within X of the baseline".
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit import LabkitError, data, env, evaluate, measure, prune, select, zoo
from labkit import export as X
from labkit.distill import narrow_cnn, train
from labkit.distill.losses import hinton_loss
from labkit.experiments.protocol import Target, check
from labkit.prune import experiment as pruning_exp
from labkit.quant import Int8Config, NF4Config, quantize_
from labkit.results import Record

NAME = "capstone"  # `labkit run capstone`
NOTEBOOK = "07_capstone"


@dataclass
class Config(pruning_exp.LMPruneConfig):
    """The pipeline's settings; the LLM's prune and recovery are :class:`pruning.LMPruneConfig`'s fields."""

    student_width: int = 16
    temperature: float = 4.0  # KD soft targets for the student and its fine-tune
    alpha: float = 0.9
    distill_epochs: int = 30
    distill_lr: float = 3e-3
    prune_ratio: float = 0.3
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    calibration_batches: int = 8  # x 64 training images for ORT's static INT8
    cnn_batch: int = 256
    repeats: int = 5
    run_lm: bool = True
    quant: tuple[str, ...] = ("int8", "nf4", "gptq")
    gptq_samples: int = 16
    gptq_seq_len: int = 256
    quant_group_size: int = 64  # GPTQ and NF4 groups
    lm_seq_len: int = 128  # timed forward: 1 x lm_seq_len tokens
    ppl_window: int = 256
    ppl_max_windows: int | None = 16
    serve_requests: int = 32
    serve_prompt_len: tuple[int, int] = (16, 128)
    serve_output_len: tuple[int, int] = (16, 64)
    max_model_len: int = 256
    # the decisions' allowed quality loss: what "keeps quality" means everywhere in the kit (select.KEEPS_QUALITY)
    within_accuracy: float = select.KEEPS_QUALITY["accuracy"]
    within_perplexity: float = select.KEEPS_QUALITY["perplexity"]
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        return cls(distill_epochs=20, finetune_epochs=8, repeats=3, calib_samples=8, recovery_steps=12,
                   recovery_batch=4, recovery_seq_len=128, recovery_samples=64, recovery_lr=3e-4,
                   quant=("int8", "nf4"), ppl_max_windows=4, serve_requests=8, serve_output_len=(8, 24))

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(distill_epochs=1, finetune_epochs=1, calibration_batches=1, repeats=1, calib_samples=2,
                   calib_seq_len=16, recovery_steps=1, recovery_batch=1, recovery_seq_len=16, recovery_samples=2,
                   quant=("int8",), gptq_samples=2, gptq_seq_len=16, lm_seq_len=16, ppl_window=16,
                   ppl_max_windows=1, serve_requests=2, serve_prompt_len=(8, 16), serve_output_len=(2, 4),
                   max_model_len=32)


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    dev = env.resolve_device(config.device)
    rec = Record("capstone", env=env.describe())
    _cnn(rec, config, dev, progress)
    if config.run_lm:
        _lm(rec, config, dev, progress)
    mark_fronts(rec)
    rec.config = {**asdict(config), "decisions": decisions(rec, config)}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def mark_fronts(rec: Record) -> None:
    """Set ``on_pareto_front`` (memory vs quality) and ``on_latency_front`` per model, over the record's variants."""
    rows = [{**v, "hardware": "here"} for v in rec.variants]
    for model in {v["model"] for v in rec.variants}:
        metric = "accuracy" if any("accuracy" in v for v in rec.variants if v["model"] == model) else "perplexity"
        for cost, key in (("weight_bytes", "on_pareto_front"), ("latency_ms_median", "on_latency_front")):
            front = {r["name"] for r in select.candidates(rows, model=model, metric=metric, cost=cost)
                     if r["on_pareto_front"]}
            for v in rec.variants:
                if v["model"] == model:
                    v[key] = v["name"] in front


def decisions(rec: Record, config: Config | None = None) -> dict[str, str]:
    """For each model and cost, the cheapest variant that keeps quality (``config.within_*``), with the reason; a
    decision the data cannot support says why (a bug still raises)."""
    config = config or Config()
    rows = [{**v, "hardware": "here"} for v in rec.variants]
    out = {}
    for model, metric, within in (("digits-cnn", "accuracy", config.within_accuracy),
                                  (config.llm, "perplexity", config.within_perplexity)):
        if any(v["model"] == model for v in rec.variants):
            for cost in ("weight_bytes", "latency_ms_median"):
                try:
                    out[f"{model} smallest {cost} within {within:g}"] = select.select(
                        rows, model=model, metric=metric, within=within, cost=cost).reason
                except LabkitError as exc:
                    out[f"{model} smallest {cost} within {within:g}"] = str(exc)
    return out


def _last(rec: Record, model: str) -> dict:
    """The record's last stage of ``model`` (the whole pipeline applied)."""
    rows = [v for v in rec.variants if v["model"] == model]
    if not rows:
        raise LabkitError(f"no {model} stage in this capstone record")
    return max(rows, key=lambda v: v["stage"])


def _first(rec: Record, model: str) -> dict:
    return next(v for v in rec.variants if v["model"] == model and v["stage"] == 0)


TARGETS = [
    Target("digits-cnn last stage weight_bytes / teacher",
           lambda r: _last(r, "digits-cnn")["weight_bytes"] / _first(r, "digits-cnn")["weight_bytes"], 0.35, "max"),
    Target("digits-cnn teacher accuracy - last stage accuracy",
           lambda r: _first(r, "digits-cnn")["accuracy"] - _last(r, "digits-cnn")["accuracy"],
           select.KEEPS_QUALITY["accuracy"], "max"),
    Target("{llm} pruned-recovered-int8 weight_bytes / dense",
           lambda r: r.variant("pruned-recovered-int8", r.config["llm"])["weight_bytes"]
           / r.variant("dense", r.config["llm"])["weight_bytes"], 0.4, "max"),
    Target("{llm} pruned-recovered-int8 perplexity / pruned-recovered (int8 costs nothing more)",
           lambda r: r.variant("pruned-recovered-int8", r.config["llm"])["perplexity"]
           / r.variant("pruned-recovered", r.config["llm"])["perplexity"], 1.01, "max"),
]


def figures(rec: Record) -> list:
    """Memory against quality for each model's stages (the Pareto view the decisions are made on)."""
    from labkit.viz.plots import models_of, scatter

    return [scatter(rec, "weight_bytes", "accuracy" if m == "digits-cnn" else "perplexity", model=m)
            for m in models_of(rec)]


# ------------------------------------------------------------------------------------------------ CNN

def _cnn(rec: Record, config: Config, dev: torch.device, progress: bool) -> None:
    splits = data.digits_splits(device=dev)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    teacher = zoo.load_vision("digits-cnn", device=dev, progress=False)
    with torch.no_grad():
        soft = teacher(xtr)

    def kd(m, b):
        return hinton_loss(m(b[0]), b[1], b[2], temperature=config.temperature, alpha=config.alpha)

    bar = tqdm(total=4, desc="capstone: digits-cnn stages", disable=not progress)
    torch.manual_seed(0)
    student = narrow_cnn(config.student_width).to(dev)
    train(student, (xtr, soft, ytr), kd, epochs=config.distill_epochs, lr=config.distill_lr, device=dev)
    bar.update(1)
    pruned = copy.deepcopy(student)
    prune.prune_cnn(pruned, config.prune_ratio, importance_name="taylor", calibration=(xtr, ytr))
    train(pruned, (xtr, soft, ytr), kd, epochs=config.finetune_epochs, lr=config.finetune_lr, device=dev)
    bar.update(1)
    batch = data.repeat_to(xte, config.cnn_batch)
    host_batch, host_xte = batch.cpu(), xte.cpu()  # ONNX Runtime's CPU provider reads numpy arrays
    with tempfile.TemporaryDirectory() as d:
        path = X.export_cnn(pruned, Path(d) / "cnn.onnx")
        calib = X.calibration_feeds(xtr, config.calibration_batches)
        qpath = X.quantize_static_int8(path, Path(d) / "cnn-int8.onnx", calib)
        sessions = {"ort": X.session(path), "ort-int8": X.session(qpath)}
        bar.update(1)
        stages = [
            ("teacher", 0, ["digits-cnn (trained on the labelled training split)"], teacher, None, None),
            ("distilled", 1, [f"KD student, half width, T={config.temperature:g} soft targets"], student, None, None),
            ("pruned-finetuned", 2, [f"prune {config.prune_ratio:.0%} channels (Taylor)", "KD fine-tune"], pruned,
             None, None),
            ("onnx-runtime", 3, ["export ONNX", "ORT fp32"], pruned, sessions["ort"], path),
            ("onnx-runtime-int8", 4, ["ORT static INT8 (QDQ)"], pruned, sessions["ort-int8"], qpath),
        ]
        fns = {}
        for name, _, _, m, sess, _ in stages:
            fns[name] = ((lambda s=sess: s.run(None, {"images": host_batch.numpy()})) if sess
                         else (lambda m=m: m(batch)))
        with torch.no_grad():
            lat = measure.compare_latency(fns, repeats=config.repeats, inner=10, device=dev, baseline="teacher")
        recipe: list[str] = []
        for name, stage, steps, m, sess, f in stages:
            recipe = recipe + steps if stage else steps
            logits = torch.from_numpy(X.run(sess, {"images": host_xte})[0]) if sess else m(xte).detach().cpu()
            rec.add(name, model="digits-cnn", stage=stage, recipe=list(recipe),
                    dtype="int8" if name.endswith("int8") else env.dtype_name(measure.compute_dtype(m)),
                    device="cpu (onnxruntime)" if sess else str(dev),
                    accuracy=evaluate.accuracy(logits, yte.cpu()), params=measure.param_count(m),
                    weight_bytes=f.stat().st_size if f else measure.weight_bytes(m), **lat[name],
                    batch=config.cnn_batch)
        bar.update(1)
    bar.close()


# ------------------------------------------------------------------------------------------------ LLM

def _lm(rec: Record, config: Config, dev: torch.device, progress: bool) -> None:
    from labkit.serve import LLM
    from labkit.serve.bench import make_workload, run_engine, summarize

    dense, tok = zoo.load_causal_lm(config.llm, device=dev, progress=False)
    calib = data.calibration_batches(tok, n=config.calib_samples, seq_len=config.calib_seq_len, device=dev)
    pruned = copy.deepcopy(dense)
    prune.prune_llm_mlp(pruned, config.mlp_ratio, calibration_ids=calib)
    recovered, info = pruning_exp.recover(pruned, dense, tok, config, progress, device=dev)
    del pruned
    models = {"dense": (0, ["smollm2-135m fp32"], dense),
              "pruned-recovered": (1, ["smollm2-135m fp32", f"prune {config.mlp_ratio:.0%} MLP channels (Taylor)",
                                      f"KD recovery {info['recovery_steps']} steps"], recovered)}
    native = ("bf16",) if env.bf16_native(dev) else ()  # the number format: a row only where bf16 is native
    for q in config.quant + native:
        m = copy.deepcopy(recovered)
        if q == "bf16":
            m = m.to(torch.bfloat16)  # weights, activations and the engine's KV cache in bf16 (dtype="auto" here)
        elif q == "gptq":
            from labkit.quant.gptq import gptq_quantize_

            gptq_quantize_(m, data.calibration_batches(tok, n=config.gptq_samples, seq_len=config.gptq_seq_len,
                                                       device=dev), group_size=config.quant_group_size, progress=False)
        else:
            quantize_(m, Int8Config() if q == "int8" else NF4Config(config.quant_group_size, double_quant=False))
        step = "bf16 weights and activations" if q == "bf16" else f"{q} weights"
        models[f"pruned-recovered-{q}"] = (2, models["pruned-recovered"][1] + [step], m)
    ids = torch.randint(0, dense.config.vocab_size, (1, config.lm_seq_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        lat = measure.compare_latency({k: (lambda m=m: m(input_ids=ids, use_cache=False, logits_to_keep=1))
                                       for k, (_, _, m) in models.items()}, repeats=config.repeats, inner=1,
                                      device=dev, baseline="dense")
    prompts, outs = make_workload(tok, config.serve_requests, config.serve_prompt_len, config.serve_output_len)
    for name, (stage, recipe, m) in tqdm(models.items(), desc="capstone: smollm2 stages", disable=not progress):
        llm = LLM(m, tok, max_num_seqs=config.serve_requests, max_model_len=config.max_model_len, device=dev)
        run_engine(llm, prompts[:2], [4, 4])  # warm-up outside the clock
        served = summarize(run_engine(llm, prompts, outs))
        rec.add(name, model=config.llm, stage=stage, recipe=recipe + ["served by labkit's paged engine"],
                dtype=env.dtype_name(measure.compute_dtype(m)),
                perplexity=evaluate.perplexity(m, tok, window=config.ppl_window, max_windows=config.ppl_max_windows),
                params=measure.param_count(m), weight_bytes=measure.weight_bytes(m), **lat[name],
                output_tokens_per_s=served["output_tokens_per_s"], serve_requests=config.serve_requests,
                **({"recovery_steps": info["recovery_steps"]} if stage else {}))
