"""Measuring honestly: real bytes, peak memory, and timing with warm-up, repeats, median and spread.

Rules this module enforces (DESIGN.md in the repository): time with warm-up and repeats, report median and IQR, and
synchronise the device (``torch.utils.benchmark`` does) — the first call on a CPU can be 10x slower.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn
from torch.utils import benchmark as tbench

from labkit import LabkitError


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's elements occupy (``numel * element_size``), whatever its dtype."""
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views, so tied/shared tensors are counted once."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = id(t)
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), t.dtype)


def _extra_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a quantized layer keeps outside ``parameters()``/``buffers()`` (e.g. bitsandbytes' quant_state)."""
    out: list[torch.Tensor] = []
    for p in module.parameters(recurse=False):
        state = getattr(p, "quant_state", None)
        if state is not None:
            out.extend(_quant_state_tensors(state))
        scb = getattr(p, "SCB", None)  # bitsandbytes LLM.int8 row scales
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    tensors = []
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            tensors.append(t)
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors.extend(_quant_state_tensors(nested))
    return tensors


def weight_bytes(model: nn.Module) -> int:
    """Real storage of a model's parameters and buffers, in bytes.

    Tied weights count once; packed quantized tensors and their constants (scales, zero points, code
    books, bitsandbytes quant states, double-quantized absmax) count at their stored dtype.
    Quantized layers may add tensors through an ``extra_weight_tensors()`` method.
    """
    seen: set[tuple] = set()
    total = 0
    tensors: list[torch.Tensor] = []
    for module in model.modules():
        tensors.extend(module.parameters(recurse=False))
        tensors.extend(module.buffers(recurse=False))
        tensors.extend(_extra_tensors(module))
        if hasattr(module, "extra_weight_tensors"):
            tensors.extend(module.extra_weight_tensors())
    for t in tensors:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    return total


def param_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights once), as a model card would state it.

    Quantized linear layers (labkit's or bitsandbytes') count their logical ``in x out`` weights, not
    the packed bytes they store.
    """
    seen: set[tuple] = set()
    n = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if _is_quantized_linear(module):
            n += module.in_features * module.out_features
            params = [p for p in params if p is module.bias]
        for p in params:
            key = _storage_key(p)
            if key not in seen:
                seen.add(key)
                n += p.numel()
    return n


def _is_quantized_linear(module: nn.Module) -> bool:
    labkit_layer = hasattr(module, "dequantize") and hasattr(module, "in_features")
    return labkit_layer or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype ``model``'s matrix products run in: the ``compute_dtype`` of its first quantized layer that
    has one (labkit's fused int8/int4 kernels, bitsandbytes' 4-bit layers), else its first float parameter's dtype.
    Every record row says it (``dtype``), since the same weights run at different speeds in fp32 and bf16."""
    for module in model.modules():
        if _is_quantized_linear(module) and getattr(module, "kernel", "fused") == "fused":
            dtype = getattr(module, "compute_dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ----------------------------------------------------------------------------------------------- memory

@dataclass
class PeakMemory:
    """Peak memory of a block: CUDA peak allocated on GPU, process RSS growth on CPU."""

    device: str
    peak_bytes: int = 0
    kind: str = ""


class track_peak_memory:
    """Context manager: ``with track_peak_memory("cuda") as pm: ...; pm.peak_bytes``.

    On CPU the number is the highest process RSS seen by a sampling thread (every ``interval_s``) above
    the level at entry — a lower bound of the true peak, since memory the allocator reuses does not
    grow RSS; on CUDA it is ``torch.cuda.max_memory_allocated`` above the level at entry.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005) -> None:
        self.result = PeakMemory(device=str(device))
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._max_rss = 0

    def _sample(self) -> None:
        proc = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self._max_rss = max(self._max_rss, proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        dev = torch.device(self.result.device)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self._start = torch.cuda.memory_allocated(dev)
            self.result.kind = "cuda_max_allocated"
        else:
            self._start = self._max_rss = psutil.Process(os.getpid()).memory_info().rss
            self.result.kind = "rss_peak_delta"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self.result

    def __exit__(self, *exc: object) -> None:
        dev = torch.device(self.result.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.result.peak_bytes = max(0, torch.cuda.max_memory_allocated(dev) - self._start)
        else:
            self._stop.set()
            self._thread.join()
            rss = max(self._max_rss, psutil.Process(os.getpid()).memory_info().rss)
            self.result.peak_bytes = max(0, rss - self._start)


# ----------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Result of :func:`benchmark`: median and interquartile range of per-call seconds."""

    median_s: float
    iqr_s: float
    n: int
    device: str
    threads: int
    times_s: list[float]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def iqr_ms(self) -> float:
        return self.iqr_s * 1e3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("times_s")
        return d

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms ± {self.iqr_ms:.3f} (IQR, n={self.n}, {self.device})"


def benchmark(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10, min_run_time: float | None = None,
              device: torch.device | str | nn.Module | torch.Tensor | None = None, threads: int | None = None,
              label: str = "") -> Timing:
    """Time ``fn()`` with ``torch.utils.benchmark.Timer``: warm-up calls, then ``repeats`` timed calls.

    ``torch.utils.benchmark`` synchronises CUDA around each measurement. With ``min_run_time`` it runs
    ``blocked_autorange`` instead of a fixed number of repeats. ``device`` is the device the work runs on (a
    device, a model or a tensor); without it the timing is labelled CPU — never guessed from what the machine has.
    """
    if repeats < 1:
        raise LabkitError(f"repeats={repeats} must be at least 1")
    if warmup < 0:
        raise LabkitError(f"warmup={warmup} must be 0 or more")
    dev = device_of(device)
    threads = threads or torch.get_num_threads()
    for _ in range(warmup):
        fn()
    _sync(dev)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
    if min_run_time is not None:
        m = timer.blocked_autorange(min_run_time=min_run_time)
        times = [t for t in m.times]
    else:
        times = [timer.timeit(1).times[0] for _ in range(repeats)]
    return Timing(median_s=statistics.median(times), iqr_s=iqr(times), n=len(times), device=str(dev),
                  threads=threads, times_s=list(times))


def percentile(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile (a whole number 1..99) with linear interpolation between the closest ranks
    (``statistics.quantiles``' "inclusive" method, numpy's default); None for no values."""
    if not (isinstance(q, int) and 1 <= q <= 99):
        raise LabkitError(f"q={q!r}: a percentile is a whole number from 1 to 99")
    if len(values) < 2:
        return float(values[0]) if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for fewer than 2 values)."""
    if len(values) < 2:
        return 0.0
    return percentile(values, 75) - percentile(values, 25)


def spread(values: list[float]) -> dict[str, float]:
    """Median, IQR, min and max of repeated measurements (the kit reports all four)."""
    if not values:
        raise LabkitError("spread() needs at least one value")
    return {"median": statistics.median(values), "iqr": iqr(values), "min": min(values), "max": max(values),
            "n": len(values)}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 3,
                progress: Callable[[str, int], None] | None = None) -> dict[str, list[Any]]:
    """Call each of ``fns`` ``repeats`` times in *rotated* order (round r starts at variant r), so slow drift of
    a shared machine (thermal, neighbours) spreads over every variant instead of biasing the last one.

    Returns each variant's results in call order. Warm-up is the caller's (an untimed call before this).
    """
    if repeats < 1:
        raise LabkitError(f"repeats={repeats} must be at least 1")
    names = list(fns)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if progress:
                progress(name, r)
            out[name].append(fns[name]())
    return out


def speedups(rows: dict[Any, dict[str, Any]], baseline: Any, metric: str = "latency_ms_median",
             higher_is_better: bool = False) -> dict[Any, float]:
    """Each row's speed-up over ``rows[baseline]``: the ratio of medians (``metric``), the kit's one definition.
    Lower-is-better metrics (latency) divide the baseline by the row; throughputs divide the row by the baseline."""
    if baseline not in rows:
        raise LabkitError(f"baseline={baseline!r} is not among the timed variants: {', '.join(map(str, rows))}")
    base = rows[baseline][metric]
    return {k: (r[metric] / base if higher_is_better else base / r[metric]) for k, r in rows.items()}


def compare_latency(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, inner: int = 1, warmup: int = 1,
                    device: Any = None, baseline: str | None = None) -> dict[str, dict[str, Any]]:
    """Latency of each of ``fns`` (same inputs, one process): ``warmup`` untimed calls each, then ``repeats``
    rotated rounds (:func:`interleaved`), each timing ``inner`` back-to-back calls (their mean, so sub-millisecond
    work is not drowned by the clock). Returns per name ``latency_ms_median``, ``_iqr``, ``_min``, ``_max``, ``_runs``
    and, given a ``baseline`` name, ``speedup_vs_baseline`` (:func:`speedups`: the ratio of medians)."""
    if inner < 1:
        raise LabkitError(f"inner={inner} must be at least 1")
    if baseline is not None and baseline not in fns:
        raise LabkitError(f"baseline={baseline!r} is not among the variants to time: {', '.join(fns)}")
    dev = device_of(device)

    def timer(fn: Callable[[], Any]) -> Callable[[], float]:
        def go() -> float:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(dev)
            return (time.perf_counter() - t0) / inner
        return go

    timers = {k: timer(f) for k, f in fns.items()}
    for t in timers.values():
        for _ in range(warmup):
            t()
    out = {}
    for name, times in interleaved(timers, repeats).items():
        s = spread(times)
        out[name] = {"latency_ms_median": 1e3 * s["median"], "latency_ms_iqr": 1e3 * s["iqr"],
                     "latency_ms_min": 1e3 * s["min"], "latency_ms_max": 1e3 * s["max"],
                     "latency_ms_runs": [round(1e3 * t, 4) for t in times]}
    if baseline is not None:
        for name, x in speedups(out, baseline).items():
            out[name]["speedup_vs_baseline"] = x
    return out


def difference(a: dict[str, Any], b: dict[str, Any], metric: str = "latency_ms", names: tuple[str, str] = ("a", "b"),
               ) -> str:
    """One honest sentence comparing two timed rows (``{metric}_median``, ``_min``, ``_max`` each, lower is
    faster): the ratio of medians, or "no measurable difference" when their min–max ranges overlap."""
    try:
        ma, mb = a[f"{metric}_median"], b[f"{metric}_median"]
        lo_a, hi_a, lo_b, hi_b = a[f"{metric}_min"], a[f"{metric}_max"], b[f"{metric}_min"], b[f"{metric}_max"]
    except KeyError as exc:
        raise LabkitError(f"difference() needs {metric}_median, _min and _max in both rows; missing {exc}") from None
    na, nb = names
    if lo_a <= hi_b and lo_b <= hi_a:
        return (f"no measurable difference between {na} and {nb} ({ma:.3g} vs {mb:.3g} median; "
                f"their min–max ranges overlap)")
    fast, slow, r = (na, nb, mb / ma) if ma < mb else (nb, na, ma / mb)
    return f"{fast} is {r:.2f}x faster than {slow} (medians; the min–max ranges do not overlap)"


def device_of(obj: Any) -> torch.device:
    """The device named by ``obj``: a device or its name, a tensor's, a model's parameters'; CPU for None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, nn.Module):
        return model_device(obj)
    return torch.device(obj or "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ------------------------------------------------------------------------------- LM throughput helpers

@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, *, batch: int = 1, seq_len: int = 128, warmup: int = 2,
                         repeats: int = 5, seed: int = 0) -> tuple[float, Timing]:
    """Tokens/s of one forward pass over ``batch x seq_len`` prompt tokens (no KV cache kept)."""
    dev = model_device(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).to(dev)
    # logits for the last position only, as serving does: full-vocabulary logits at every position would add a
    # 28 M-parameter matmul per token that no prefill needs, and dilute what the model's own layers cost.
    t = benchmark(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=warmup, repeats=repeats,
                  device=dev)
    return batch * seq_len / t.median_s, t


DECODE_LOOPS = ("hf", "static")


@torch.no_grad()
def decode_step_times(model: nn.Module, *, batch: int = 1, prompt_len: int = 32, new_tokens: int = 32,
                      seed: int = 0, around: Callable[[], Any] | None = None, loop: str = "hf",
                      dtype: torch.dtype | None = None, prepack: bool = False) -> Callable[[], float]:
    """A function that times ``new_tokens`` cached greedy decode steps *alone* and returns seconds.

    Each call first runs the prompt (prefill, untimed) to build a fresh KV cache, then times only the
    single-token steps, so a short prompt's prefill does not pass itself off as decode speed. ``around()``, if
    given, returns a context manager entered for the timed steps only (e.g. a profiler). ``loop="hf"`` steps the
    Hugging Face model with its dynamic cache; ``loop="static"`` steps :class:`labkit.decode.StaticDecoder` on the
    same weights (a preallocated cache, no per-step bookkeeping; activations in ``dtype``; ``prepack``: its float
    linears laid out once for oneDNN, :mod:`labkit.prepack`).
    """
    if new_tokens < 1:
        raise LabkitError(f"new_tokens={new_tokens} must be at least 1")
    if loop not in DECODE_LOOPS:
        raise LabkitError(f"loop={loop!r} is not one of {DECODE_LOOPS}")
    if prepack and loop != "static":
        raise LabkitError(f"prepack=True with loop={loop!r}: only loop='static' runs prepacked weights")
    dev = model_device(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).to(dev)
    if loop == "static":
        from labkit.decode import StaticDecoder

        dec = StaticDecoder(model, batch=batch, max_len=prompt_len + new_tokens, dtype=dtype, prepack=prepack)

        def prefill() -> Callable[[], None]:
            """Run the prompt on a fresh cache; returns the single-token step that continues from it."""
            dec.reset()
            nxt = dec.forward(ids).argmax(-1, keepdim=True)

            def step() -> None:
                nonlocal nxt
                nxt = dec.forward(nxt).argmax(-1, keepdim=True)
            return step
    else:
        def prefill() -> Callable[[], None]:
            out = model(input_ids=ids, use_cache=True)
            past, nxt, pos = out.past_key_values, out.logits[:, -1:].argmax(-1), prompt_len

            def step() -> None:
                nonlocal past, nxt, pos
                out = model(input_ids=nxt, past_key_values=past, use_cache=True,
                            position_ids=torch.full((batch, 1), pos, device=dev))
                past, nxt, pos = out.past_key_values, out.logits[:, -1:].argmax(-1), pos + 1
            return step

    @torch.no_grad()
    def run() -> float:
        step = prefill()
        _sync(dev)
        with around() if around else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                step()
            _sync(dev)
            return time.perf_counter() - t0

    return run


# One grouping of profiler operator names for every breakdown in the kit (decode steps here, engine steps in
# labkit.serve.profile): the first group whose key occurs in the name wins; the rest is OTHER. The composites
# (aten::linear, aten::matmul, aten::embedding) have next to no self time and would count each call twice.
MATMUL = "matmul"
ATTENTION = "attention"
GATHER = "gather (index_select: KV blocks, embedding rows)"
WRITE = "cache writes (index_put, cat)"
COPY = "copies and casts"
OTHER = "other tensor ops (norms, activations, rotary, dequantize)"
OUTSIDE_OPS = "outside torch ops (Python, module calls, scheduling, bookkeeping)"
_OP_GROUPS = ((MATMUL, ("addmm", "aten::mm", "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm", "aten::bmm",
                        "_linear_pointwise")),  # the last: oneDNN's prepacked linear (labkit.prepack)
              (ATTENTION, ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
              (GATHER, ("index_select",)),
              (WRITE, ("index_put", "aten::cat", "aten::stack")),
              (COPY, ("copy_", "_to_copy", "aten::to", "contiguous", "clone")))
OP_GROUPS = tuple(g for g, _ in _OP_GROUPS) + (OTHER,)


def op_group(name: str) -> str:
    """The group of one profiler event's operator name (one of :data:`OP_GROUPS`)."""
    for group, keys in _OP_GROUPS:
        if any(k in name for k in keys):
            return group
    return OTHER


@torch.no_grad()
def decode_breakdown(model: nn.Module, *, prompt_len: int = 32, new_tokens: int = 8, seed: int = 0,
                     loop: str = "hf", prepack: bool = False) -> list[dict[str, Any]]:
    """Where batch-1 cached decode steps spend their time, by torch's profiler: each op's *self* time summed by
    kind (nested ops are not counted twice), and the wall time outside every op — Python in the model's modules,
    the cache's bookkeeping, dispatch — as its own row. On a GPU the op rows are kernel time on the device and the
    last row is the time the device sat idle. The profiler adds a little cost to every op, so the rows are shares
    of a profiled run (after one unprofiled warm-up), not a second speed measurement.

    ``loop`` and ``prepack`` as :func:`decode_step_times` (``loop="static"``: the kit's lean loop).
    Rows: ``part``, ``ms_per_token``, ``share_pct``, ``ops`` (op calls per token).
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = model_device(model).type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []))
    steps = dict(prompt_len=prompt_len, new_tokens=new_tokens, seed=seed, loop=loop, prepack=prepack)
    decode_step_times(model, **steps)()  # warm-up
    wall = decode_step_times(model, **steps, around=lambda: prof)()
    by_kind: dict[str, list[float]] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) if on_gpu else event.self_cpu_time_total
        kind = by_kind.setdefault(op_group(event.key), [0.0, 0])
        kind[0] += us / 1e6
        kind[1] += event.count
    inside = sum(t for t, _ in by_kind.values())
    rows = [{"part": kind, "ms_per_token": 1e3 * t / new_tokens, "share_pct": 100 * t / wall, "ops": n / new_tokens}
            for kind, (t, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])]
    outside = max(wall - inside, 0.0)
    rows.append({"part": "device idle (launches, Python)" if on_gpu else OUTSIDE_OPS,
                 "ms_per_token": 1e3 * outside / new_tokens, "share_pct": 100 * outside / wall, "ops": 0.0})
    return rows


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, *, batch: int = 1, prompt_len: int = 32, new_tokens: int = 32,
                        warmup: int = 1, repeats: int = 3, seed: int = 0) -> tuple[float, Timing]:
    """Tokens/s of cached greedy decode steps after a ``prompt_len`` prompt, prefill excluded (median of
    ``repeats`` after ``warmup``)."""
    run = decode_step_times(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seed=seed)
    for _ in range(warmup):
        run()
    times = [run() for _ in range(repeats)]
    t = Timing(median_s=statistics.median(times), iqr_s=iqr(times), n=len(times), device=str(model_device(model)),
               threads=torch.get_num_threads(), times_s=times)
    return batch * new_tokens / t.median_s, t
