"""Distillation: a narrow CNN student learns from the digits teacher on 5 labelled images per class, with and
without the teacher's soft targets, over several seeds; a layer-dropped SmolLM2 student recovers with next-token
loss vs token-level KD for the same steps on the same text.

Scratch and KD students see *the same* labelled images, so the KD gain is what soft targets carry beyond hard
labels. Two more variants show the common practical setting — distilling on a larger unlabelled transfer set — and
its control: the teacher's hard pseudo-labels on the same transfer set.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labkit import data, env, evaluate, measure, zoo
from labkit.distill import layer_dropped_lm, narrow_cnn, token_kd_loss, train
from labkit.distill.losses import hinton_loss
from labkit.experiments.protocol import Target, Variant, check
from labkit.results import Record

NAME = "distillation"  # `labkit run distillation`
NOTEBOOK = "03_distillation"


@dataclass
class Config:
    teacher: str = "digits-cnn"
    student_width: int = 16
    labels_per_class: int = 5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 200  # on the labelled images (one mini-batch each epoch)
    transfer_epochs: int = 20  # on the whole training split, unlabelled
    temperature: float = 4.0
    alpha: float = 0.9
    temperatures: tuple[float, ...] = (1, 2, 4, 8)
    lr: float = 3e-3
    latency_batch: int = 256
    latency_repeats: int = 5
    run_lm: bool = True
    llm: str = "smollm2-135m"
    lm_keep: tuple[int, ...] = tuple(range(0, 10)) + tuple(range(20, 30))  # drop the middle third
    lm_steps: int = 400
    lm_batch: int = 8
    lm_seq_len: int = 256
    lm_calib_samples: int = 1024
    lm_lr: float = 3e-4
    lm_kd_weight: float = 0.5  # KD loss weight; the rest is next-token loss
    ppl_window: int = 256
    ppl_max_windows: int | None = 8
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        # 32 steps of 4 x 64 tokens over 32 calibration windows: 4 passes over little text, what 2 CPU cores afford
        return cls(seeds=(0, 1, 2), lm_steps=32, lm_batch=4, lm_seq_len=64, lm_calib_samples=32)

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(seeds=(0,), epochs=1, transfer_epochs=1, temperatures=(2,), latency_repeats=1, lm_steps=1,
                   lm_batch=1, lm_seq_len=16, lm_calib_samples=2, ppl_window=16, ppl_max_windows=1, lm_keep=(0,))


def labelled_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` examples of every class, chosen with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(int(y.max()) + 1):
        ids = (y == c).nonzero().flatten()
        idx += ids[torch.randperm(len(ids), generator=g)[:per_class]].tolist()
    return torch.tensor(sorted(idx))


def run(config: Config | None = None, progress: bool = True, kd_loss=None) -> Record:
    """Every variant of the lesson. ``kd_loss(student_logits, teacher_logits, labels, T, alpha)`` replaces
    Hinton's loss for the labelled KD students (the notebook passes the learner's own); the record names it."""
    config = config or Config()
    dev = env.resolve_device(config.device)
    rec = Record("distillation", env=env.describe())
    loss = kd_loss or hinton_loss
    extra = _cnn_variants(rec, config, dev, progress, loss)
    extra["kd_loss"] = f"{getattr(loss, '__module__', '?')}.{getattr(loss, '__qualname__', '?')}"
    if config.run_lm:
        extra.update(_lm_variants(rec, config, dev, progress))
    rec.config = {**asdict(config), **extra}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


# ------------------------------------------------------------------------------------------------ CNN

def _cnn_variants(rec: Record, config: Config, dev: torch.device, progress: bool, kd_loss) -> dict:
    teacher = zoo.load_vision(config.teacher, device=dev, progress=False)
    splits = data.digits_splits(device=dev)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    with torch.no_grad():
        tlog = teacher(xtr)
    ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731

    def kd(temperature: float):
        def loss(m, b):
            return kd_loss(m(b[0]), b[1], b[2], temperature, config.alpha)
        return loss

    def transfer_kd(m, b):  # soft targets on every image; the hard loss only where a label exists (-100: none)
        s = m(b[0])
        soft = hinton_loss(s, b[1], None, temperature=config.temperature, alpha=1.0)
        has = b[2] != -100
        hard = F.cross_entropy(s[has], b[2][has]) if has.any() else s.sum() * 0
        return config.alpha * soft + (1 - config.alpha) * hard

    # Each student's build(seed data) -> (training tensors, loss, epochs); settings are fields, not parsed names
    def kd_on_labelled(t: float):
        return lambda d: ((d["x"], d["soft"], d["y"]), kd(t), config.epochs)

    jobs = [Variant("student-scratch", lambda d: ((d["x"], d["y"]), ce, config.epochs), "hard labels only"),
            Variant("student-kd", kd_on_labelled(config.temperature), "Hinton's loss on the labelled images",
                    {"temperature": config.temperature, "alpha": config.alpha})]
    jobs += [Variant(f"student-kd-T{t:g}", kd_on_labelled(float(t)), "the temperature sweep",
                     {"temperature": float(t), "alpha": config.alpha}) for t in config.temperatures]
    jobs += [Variant("student-kd-transfer", lambda d: ((xtr, tlog, d["labels"]), transfer_kd, config.transfer_epochs),
                     "soft targets on every training image, labels where known",
                     {"temperature": config.temperature, "alpha": config.alpha}),
             Variant("student-pseudo-transfer", lambda d: ((xtr, d["pseudo"]), ce, config.transfer_epochs),
                     "the control: the teacher's hard labels on the same images")]
    runs: dict[str, list[float]] = {}
    curves: dict[str, list[float]] = {}
    bar = tqdm(total=len(jobs) * len(config.seeds), desc="distillation students x seeds", disable=not progress)
    student = None
    for seed in config.seeds:
        sub = labelled_subset(ytr, config.labels_per_class, seed)
        labels = torch.full_like(ytr, -100)
        labels[sub] = ytr[sub]
        pseudo = tlog.argmax(1)
        pseudo[sub] = ytr[sub]
        seed_data = {"x": xtr[sub], "y": ytr[sub], "soft": tlog[sub], "labels": labels, "pseudo": pseudo}
        for job in jobs:
            name = job.name
            torch.manual_seed(seed)
            student = narrow_cnn(config.student_width).to(dev)
            args = job.build(seed_data)
            hist = train(
                student,
                args[0],
                args[1],
                epochs=args[2],
                lr=config.lr,
                seed=seed,
                device=dev,
                eval_fn=(lambda m: evaluate.classifier_accuracy(m, xte, yte)) if seed == config.seeds[0] else None,
            )
            runs.setdefault(name, []).append(evaluate.classifier_accuracy(student, xte, yte))
            if hist.metric:
                curves[name] = hist.metric
            bar.update(1)
    bar.close()
    lat = _latency({"teacher": teacher, "student": student}, xte, config, dev)
    t_params = measure.param_count(teacher)
    rec.add("teacher", model=config.teacher, params=t_params, weight_bytes=measure.weight_bytes(teacher),
            dtype=env.dtype_name(measure.compute_dtype(teacher)),
            accuracy=evaluate.classifier_accuracy(teacher, xte, yte), accuracy_std=0.0, seeds=1, **lat["teacher"],
            notes="trained on the full labelled training split")
    s_params = measure.param_count(student)
    for name, accs in runs.items():
        rec.add(name, model=f"digits-cnn-w{config.student_width}", params=s_params,
                dtype=env.dtype_name(measure.compute_dtype(student)),
                weight_bytes=measure.weight_bytes(student), accuracy=statistics.mean(accs),
                accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, seeds=len(accs),
                accuracy_per_seed=accs, accuracy_curve_seed0=curves.get(name), **lat["student"])
    return {"labelled_images": config.labels_per_class * 10, "transfer_images": len(xtr), "test_images": len(xte),
            "student_params_ratio": s_params / t_params,
            "latency": f"batch of {config.latency_batch} test images, {config.latency_repeats} rotated repeats"}


def _latency(models: dict, x: torch.Tensor, config: Config, dev: torch.device) -> dict[str, dict]:
    batch = x[:config.latency_batch]
    with torch.no_grad():
        lat = measure.compare_latency({k: (lambda m=m: m(batch)) for k, m in models.items()},
                                      repeats=config.latency_repeats, inner=20, device=dev, baseline="teacher")
    return {k: {"latency_ms_median": v["latency_ms_median"], "latency_ms_iqr": v["latency_ms_iqr"],
                "speedup_vs_baseline": v["speedup_vs_baseline"], "latency_batch": config.latency_batch}
            for k, v in lat.items()}


# ------------------------------------------------------------------------------------------------ LM

def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _lm_variants(rec: Record, config: Config, dev: torch.device, progress: bool) -> dict:
    teacher, tok = zoo.load_causal_lm(config.llm, device=dev, progress=False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ppl = lambda m: evaluate.perplexity(m, tok, window=config.ppl_window, stride=config.ppl_window,  # noqa: E731
                                        max_windows=config.ppl_max_windows)
    calib = data.calibration_batches(tok, n=config.lm_calib_samples, seq_len=config.lm_seq_len, device=dev)
    rec.add("lm-teacher", model=config.llm, params=measure.param_count(teacher), perplexity=ppl(teacher),
            dtype=env.dtype_name(measure.compute_dtype(teacher)),
            layers=teacher.config.num_hidden_layers)
    init = layer_dropped_lm(teacher, keep=list(config.lm_keep))
    base = {"model": f"{config.llm}-{len(config.lm_keep)}L", "params": measure.param_count(init),
            "dtype": env.dtype_name(measure.compute_dtype(init)),
            "layers": len(config.lm_keep)}
    rec.add("lm-student-init", **base, perplexity=ppl(init), steps=0)

    def next_token(m, b):
        return _next_token_loss(m(input_ids=b[0]).logits, b[0])

    def kd(m, b):
        with torch.no_grad():
            t = teacher(input_ids=b[0]).logits
        logits = m(input_ids=b[0]).logits
        return config.lm_kd_weight * token_kd_loss(logits, t) + \
            (1 - config.lm_kd_weight) * _next_token_loss(logits, b[0])

    for name, loss in (("lm-student-lmloss", next_token), ("lm-student-kd", kd)):
        student = copy.deepcopy(init)
        t0 = time.perf_counter()
        hist = train(student, (calib,), loss, epochs=10**6, batch_size=config.lm_batch, lr=config.lm_lr, seed=0,
                     max_steps=config.lm_steps, desc=name, device=dev, progress=progress)
        rec.add(name, **base, perplexity=ppl(student), steps=hist.steps, tokens=hist.examples * config.lm_seq_len,
                train_loss=hist.train_loss, train_s=round(time.perf_counter() - t0, 1))
    passes = config.lm_steps * config.lm_batch / config.lm_calib_samples
    return {"lm_note": f"{config.lm_steps} steps of {config.lm_batch} x {config.lm_seq_len} tokens over "
                       f"{config.lm_calib_samples} calibration windows ({passes:.1f} passes) for both students (same "
                       "data, same order, same learning rate); "
                       + ("quick mode: tens of steps on 2 CPU cores, far from converged — full mode is sized for a "
                          "Colab GPU" if config.lm_steps < 100 else "full mode"),
            "lm_kd_loss": f"{config.lm_kd_weight} x forward token KL(teacher||student) + "
                          f"{1 - config.lm_kd_weight:g} x next-token loss"}


# ------------------------------------------------------------------------------------------------ targets

TARGETS = [
    Target(
        "student params / teacher params",
        lambda r: r.variant("student-kd")["params"] / r.variant("teacher")["params"],
        0.5,
        "max",
    ),
    Target(
        "student-kd accuracy - student-scratch accuracy",
        lambda r: r.variant("student-kd")["accuracy"] - r.variant("student-scratch")["accuracy"],
        0.0,
        "min",
    ),
    Target(
        "student-kd accuracy / teacher accuracy",
        lambda r: r.variant("student-kd")["accuracy"] / r.variant("teacher")["accuracy"],
        0.95,
        "min",
    ),
    Target(
        "lm-student-kd perplexity - lm-student-lmloss perplexity",
        lambda r: r.variant("lm-student-kd")["perplexity"] - r.variant("lm-student-lmloss")["perplexity"],
        0.0,
        "max",
    ),
]


def figures(rec: Record) -> list:
    """Test accuracy of the teacher and every student (mean over seeds), then the LM students' perplexity."""
    from labkit.viz.plots import metric_bars

    figs = [metric_bars(rec, "accuracy", title="distillation: digits test accuracy (mean over seeds)")]
    if any(v["name"].startswith("lm-") for v in rec.variants):
        figs.append(metric_bars(rec, "perplexity", log=True, title="distillation: SmolLM2 held-out perplexity"))
    return figs


def _points(a: dict, b: dict) -> tuple[float, float]:
    """Accuracy difference a - b in points, and the larger seed standard deviation of the two (in points)."""
    return 100 * (a["accuracy"] - b["accuracy"]), 100 * max(a.get("accuracy_std", 0.0), b.get("accuracy_std", 0.0))


def cnn_findings(rec: Record) -> list[str]:
    """The digits lesson's sentences, every comparative computed from the record it describes (so a record with
    the opposite outcome says the opposite)."""
    v = {x["name"]: x for x in rec.variants}
    scratch, kd, teacher = v["student-scratch"], v["student-kd"], v["teacher"]
    gain, sd = _points(kd, scratch)
    verb = (f"add {gain:.1f} points" if gain > sd else f"cost {-gain:.1f} points" if gain < -sd
            else f"make no measurable difference ({gain:+.1f} points, within a seed standard deviation of {sd:.1f})")
    out = [f"On the same {rec.config['labelled_images']} labelled images, soft targets "
           f"(T={rec.config['temperature']:g}) {verb} ({100 * scratch['accuracy']:.1f}% → {100 * kd['accuracy']:.1f}%, "
           f"mean of {kd['seeds']} seeds), reaching {kd['accuracy'] / teacher['accuracy']:.1%} of the teacher with "
           f"{kd['params'] / teacher['params']:.0%} of its parameters, {kd['speedup_vs_baseline']:.2f}x its speed."]
    sweep = {n.removeprefix("student-kd-"): x["accuracy"] for n, x in v.items() if n.startswith("student-kd-T")}
    if sweep:
        best = max(sweep, key=sweep.get)
        out.append(f"Temperature: {', '.join(f'{t} {100 * a:.1f}%' for t, a in sweep.items())}; best {best}.")
    if "student-kd-transfer" in v and "student-pseudo-transfer" in v:
        soft, hard = v["student-kd-transfer"], v["student-pseudo-transfer"]
        d, sd = _points(soft, hard)
        head = (f"With {rec.config['transfer_images']} unlabelled images: soft targets {100 * soft['accuracy']:.1f}%, "
                f"the teacher's hard labels {100 * hard['accuracy']:.1f}% — ")
        if abs(d) <= sd:
            out.append(head + f"no measurable difference ({d:+.1f} points, within a seed standard deviation of "
                       f"{sd:.1f}): with plenty of data for the teacher to label, the labelling itself does the work.")
        elif d < 0:
            out.append(head + f"soft targets are {-d:.1f} points *below* hard labels here (more than the seed "
                       f"standard deviation, {sd:.1f}): with plenty of data, the teacher's labels beat its "
                       "probabilities at this temperature.")
        else:
            out.append(head + f"soft targets add {d:.1f} points over hard labels (seed standard deviation {sd:.1f}): "
                       "the teacher's relative probabilities carry information its labels do not.")
    return out


def lm_findings(rec: Record) -> list[str]:
    """The language-model lesson's sentences, computed from the record (see :func:`cnn_findings`)."""
    import math

    lv = {x["name"]: x for x in rec.variants}
    if "lm-student-kd" not in lv:
        return ["The language-model students were not trained in this record (run_lm=False)."]
    init, ce, kd, teacher = (lv[n] for n in ("lm-student-init", "lm-student-lmloss", "lm-student-kd", "lm-teacher"))
    c = rec.config
    out = [f"After {kd['steps']} steps: next-token loss {ce['perplexity']:.1f}, KD {kd['perplexity']:.1f} perplexity "
           f"(teacher {teacher['perplexity']:.1f}, student before training {init['perplexity']:.0f}). "
           + ("KD is ahead." if kd["perplexity"] < ce["perplexity"] else
              "Next-token loss is ahead." if ce["perplexity"] < kd["perplexity"] else "They tie.")]
    passes = c["lm_steps"] * c["lm_batch"] / c["lm_calib_samples"]
    moved = ("improved" if ce["perplexity"] < init["perplexity"] else "worsened")
    train_ppl = math.exp(ce["train_loss"][-1])
    fit = (f"its final training loss {ce['train_loss'][-1]:.2f} (perplexity {train_ppl:.0f} on the text it trained "
           f"on) is far below its held-out {ce['perplexity']:.0f}: after {passes:.0f} passes over little text it "
           "fits that text much better than text it has not seen"
           if train_ppl < 0.5 * ce["perplexity"] else
           f"its training perplexity ({train_ppl:.0f}) is close to its held-out one ({ce['perplexity']:.0f}): it is "
           "not memorising the training text")
    out.append(f"Next-token loss alone {moved} held-out perplexity from {init['perplexity']:.0f} to "
               f"{ce['perplexity']:.0f}; {fit}. KD's targets are the teacher's whole distribution over the "
               f"vocabulary at every position, far more signal per token than one next token.")
    out.append("With much more text and steps (the full mode) the gap may narrow; that is not measured here yet.")
    return out
