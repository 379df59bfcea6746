import subprocess
import sys

import pytest
import torch
from torch import nn

from labkit import LabkitError, measure


def test_weight_bytes_counts_dtypes_and_buffers():
    m = nn.Linear(10, 20)  # 200 + 20 fp32
    assert measure.weight_bytes(m) == 220 * 4
    m.register_buffer("scale", torch.zeros(5, dtype=torch.float16))
    assert measure.weight_bytes(m) == 220 * 4 + 10
    assert measure.weight_bytes(m.half()) == 220 * 2 + 10


def test_weight_bytes_counts_tied_weights_once():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert measure.weight_bytes(model) == 800 * 4
    assert measure.param_count(model) == 800


def test_weight_bytes_counts_packed_uint8_storage():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.zeros(64, 32, dtype=torch.uint8))  # 64x64 4-bit
            self.register_buffer("scales", torch.zeros(64, 1, dtype=torch.float16))

    assert measure.weight_bytes(Packed()) == 64 * 32 + 64 * 2


def test_weight_bytes_sees_extra_tensors():
    class WithExtra(nn.Module):
        def extra_weight_tensors(self):
            return [torch.zeros(7, dtype=torch.float32)]

    assert measure.weight_bytes(WithExtra()) == 28


def test_benchmark_counts_its_calls_and_reports_the_median_of_its_own_times():
    calls = []
    t = measure.benchmark(lambda: calls.append(1), warmup=2, repeats=5)
    # our 2 warm-up calls, then 5 measurements; torch's Timer.timeit(1) warms each one with 2 calls of its own
    assert len(calls) == 2 + 5 * (1 + 2) and t.n == 5 and len(t.times_s) == 5 and t.device == "cpu"
    ordered = sorted(t.times_s)  # five times: the median is the third, the quartiles (inclusive) the 2nd and 4th
    assert t.median_s == ordered[2] and t.iqr_s == pytest.approx(ordered[3] - ordered[1])
    assert "IQR" in str(t)


def test_benchmark_rejects_bad_repeats():
    with pytest.raises(LabkitError, match="repeats=0"):
        measure.benchmark(lambda: None, repeats=0)


def test_iqr_hand_computed():
    assert measure.iqr([1, 2, 3, 4, 5]) == 2.0
    assert measure.iqr([3.0]) == 0.0


def test_peak_memory_sees_a_big_allocation():
    # In a fresh process: after hundreds of tests this process's allocator may hand back memory it already holds,
    # and RSS (what the tracker reads, a documented lower bound) would not grow at all.
    code = """
import time, torch
from labkit import measure
with measure.track_peak_memory("cpu") as pm:
    x = torch.empty(512 * 2**20 // 4)  # 512 MiB, fresh pages
    x.fill_(1.0)
    time.sleep(0.05)  # the sampler runs every 5 ms
    del x
print(pm.kind, pm.peak_bytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2] == "rss_peak_delta"
    assert int(out[-1]) > 256 * 2**20


def test_lm_throughput_helpers_return_positive(tiny_lm):
    tps, t = measure.prefill_tokens_per_s(tiny_lm, seq_len=16, repeats=2)
    assert tps > 0 and t.n == 2
    tps, t = measure.decode_tokens_per_s(tiny_lm, prompt_len=4, new_tokens=4, repeats=2)
    assert tps > 0


def test_difference_calls_overlapping_ranges_no_measurable_difference():
    from labkit.measure import difference

    a = {"latency_ms_median": 100.0, "latency_ms_min": 95.0, "latency_ms_max": 110.0}
    b = {"latency_ms_median": 106.0, "latency_ms_min": 104.0, "latency_ms_max": 120.0}
    assert difference(a, b, names=("fused", "unfused")).startswith("no measurable difference between fused and unfused")
    c = {"latency_ms_median": 150.0, "latency_ms_min": 140.0, "latency_ms_max": 160.0}
    assert difference(a, c, names=("x", "y")) == "x is 1.50x faster than y (medians; the min–max ranges do not overlap)"
    assert difference(c, a, names=("y", "x")).startswith("x is 1.50x faster than y")
    with pytest.raises(LabkitError, match="latency_ms_min"):
        difference({"latency_ms_median": 1.0}, a)


def test_decode_breakdown_accounts_for_the_profiled_steps(tiny_lm):
    from labkit.quant import Int8Config, quantize_

    quantize_(tiny_lm, Int8Config())
    rows = measure.decode_breakdown(tiny_lm, prompt_len=4, new_tokens=2)
    parts = {r["part"]: r for r in rows}
    assert parts[measure.MATMUL]["ops"] >= 2 * 7 + 1  # 7 int8 projections a layer, 2 layers, the fp32 lm_head
    assert rows[-1]["part"] == measure.OUTSIDE_OPS and rows[-1]["ops"] == 0
    assert set(parts) <= {*measure.OP_GROUPS, measure.OUTSIDE_OPS} and all(r["ms_per_token"] >= 0 for r in rows)


def test_one_operator_grouping_for_every_breakdown():
    from labkit.serve import profile

    assert measure.op_group("aten::_weight_int8pack_mm") == measure.op_group("aten::addmm") == measure.MATMUL
    assert measure.op_group("aten::_scaled_dot_product_flash_attention_for_cpu") == measure.ATTENTION
    assert measure.op_group("aten::index_select") == measure.GATHER == profile.GATHER
    assert measure.op_group("aten::index_put_") == measure.op_group("aten::cat") == measure.WRITE
    assert measure.op_group("aten::silu") == measure.OTHER
    assert profile.op_group is measure.op_group and profile.GROUPS[:-1] == measure.OP_GROUPS


def test_percentile_by_hand_and_against_numpy():
    """The one percentile helper (serving's p50/p99 and the IQR use it): hand values, numpy's linear default."""
    import numpy as np

    assert measure.percentile([5, 1, 3, 2, 4], 50) == 3
    assert measure.percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert measure.percentile([7.0], 99) == 7.0 and measure.percentile([], 50) is None
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 101):
        values = rng.exponential(size=n).tolist()
        for q in (1, 25, 50, 75, 99):
            assert measure.percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError, match="q=100"):
        measure.percentile([1.0, 2.0], 100)


def test_compute_dtype_is_what_the_matrix_products_run_in():
    from labkit.quant import api
    from tests.conftest import tiny_llama

    model = tiny_llama()
    assert measure.compute_dtype(model) == torch.float32
    assert measure.compute_dtype(tiny_llama().to(torch.bfloat16)) == torch.bfloat16
    api.quantize_(model, api.Int8Config(kernel="fused"))  # int8 weights, bf16 activations
    assert measure.compute_dtype(model) == torch.bfloat16
    readable = tiny_llama()
    api.quantize_(readable, api.Int8Config(kernel="dequantize"))  # dequantized to the input's dtype
    assert measure.compute_dtype(readable) == torch.float32


def test_prepacked_decode_timing_needs_the_static_loop():
    from tests.conftest import tiny_llama

    with pytest.raises(ValueError, match="prepack=True with loop='hf'"):
        measure.decode_step_times(tiny_llama(), prepack=True)
    assert measure.decode_step_times(tiny_llama(), loop="static", prepack=True, prompt_len=4, new_tokens=2)() > 0
