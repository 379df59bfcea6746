"""The side by side: the kit's rows always run, an engine that is not here is said (never faked), and where
llama.cpp or vLLM is installed they run on the kit's own weights and agree with it."""

import os
import sys

import pytest

from labkit import env
from labkit.experiments.protocol import check
from labkit.results import Record
from labkit.serve import experiment_engines as E


def _without_engines(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    monkeypatch.setattr(E, "_vllm_python", lambda config: "no vLLM here (test)")


@pytest.mark.slow
def test_without_the_other_engines_the_kit_rows_run_and_the_rest_is_said(monkeypatch):
    _without_engines(monkeypatch)
    rec = E.run(E.Config.smallest(), progress=False)
    names = [v["name"] for v in rec.variants]
    bits = (32, 16, 8, 4) if env.bf16_native() else (32, 8, 4)
    assert names == [E.KIT_ROWS[b] for b in bits]
    assert all(v["engine"] == "labkit" and v["decode_tokens_per_s"] > 0 for v in rec.variants)
    assert rec.variants[0]["greedy_tokens_agreeing_with_kit_fp32"] == 1.0  # fp32 against itself
    fp32, int4 = rec.variants[0], rec.variants[-1]  # how close to the limit: the same bandwidth, fewer bytes at 4 bits
    assert fp32["bytes_read_per_token"] > 4 * int4["bytes_read_per_token"] > 0
    assert int4["bandwidth_ceiling_tok_s"] > 4 * fp32["bandwidth_ceiling_tok_s"]
    assert all(v["pct_of_bandwidth_ceiling"] == 100 * v["decode_tokens_per_s"] / v["bandwidth_ceiling_tok_s"]
               for v in rec.variants)
    missing = rec.config["missing"]
    assert set(missing) == {"llama.cpp", "vllm"} and "llama-cpp-python" in missing["llama.cpp"]
    assert all(t["ok"] is None for t in rec.config["targets"].values())  # nothing to compare: not measured, not passed
    assert "no vLLM here (test)" in E.headline(rec)


def _rec(kit: float, theirs: float) -> Record:
    rec = Record("engines", config={})
    rec.add("kit int8", model="m", question="decode", engine="labkit", bits=8, decode_tokens_per_s=kit)
    rec.add("llama.cpp Q8_0", model="m", engine="llama.cpp", bits=8, decode_tokens_per_s=theirs,
            speed_vs_kit_same_bits=theirs / kit)
    rec.add("labkit serve fp32", model="m", question="serving", engine="labkit", dtype="float32",
            output_tokens_per_s=kit, speed_vs_vllm_same_dtype=kit / theirs)
    return rec


def test_targets_read_each_pair_at_its_own_width():
    got = check(_rec(40.0, 80.0), E.TARGETS)
    assert got["llama.cpp Q8_0 / kit int8 batch-1 decode"] == {"value": 2.0, "limit": 1.5, "kind": "max", "ok": False}
    assert got["labkit serve / vLLM CPU output tok/s at float32"]["value"] == 0.5
    assert got["labkit serve / vLLM CPU output tok/s at bfloat16"]["ok"] is None  # no bf16 pair in this record
    assert got["llama.cpp F32 / kit fp32 batch-1 decode"]["ok"] is None
    assert check(_rec(60.0, 80.0), E.TARGETS)["llama.cpp Q8_0 / kit int8 batch-1 decode"]["ok"] is True
    rec = _rec(40.0, 80.0)
    rec.variants[-1].update(tpot_ms_p50=60.0, ttft_ms_p50=400.0)
    rec.add("vllm-cpu fp32", model="m", question="serving", engine="vllm-cpu", dtype="float32",
            output_tokens_per_s=80.0, tpot_ms_p50=50.0, ttft_ms_p50=500.0)
    said = E.headline(rec)
    assert "llama.cpp / kit batch-1 decode: 2x at 8 bits" in said and "0.5x at float32" in said
    assert "vLLM's decode step takes 50 ms (TPOT p50) against labkit's 60, its first token 500 ms against 400" in said
    rec = _rec(40.0, 80.0)
    rec.variants[0].update(profiled_matmul_ms_per_token=10.0)  # the kit: 25 ms a token; llama.cpp: 12.5
    assert "the gap is the work around them" in E.headline(rec)
    rec.variants[0].update(profiled_matmul_ms_per_token=20.0)
    assert "the kernels are the gap" in E.headline(rec)


@pytest.mark.gpu
def test_on_a_gpu_the_kit_rows_run_there_and_the_cpu_engines_are_said():
    rec = E.run(E.Config.smallest(), progress=False)  # the default device: the GPU
    assert {v["name"] for v in rec.variants} == {"kit fp32", "kit bf16", "kit int8", "kit int4-g128"}
    assert "CPU engines" in rec.config["missing"]["vllm"] and "CPU engines" in rec.config["missing"]["llama.cpp"]


def test_an_engine_not_here_is_said_with_how_to_install_it(monkeypatch):
    monkeypatch.delenv("LABKIT_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(E.subprocess, "run", lambda *a, **k: type("P", (), {"returncode": 1})())
    why = E._vllm_python(E.Config(vllm_python="/nowhere/python"))
    assert why.startswith("no vLLM here") and "LABKIT_VLLM_PYTHON" in why


@pytest.mark.slow
def test_llama_cpp_runs_the_kits_own_weights():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[llamacpp])")
    rec = E.run(E.Config.smallest(), progress=False)
    rows = {v["name"]: v for v in rec.variants}
    assert rows["llama.cpp F32"]["greedy_tokens_agreeing_with_kit_fp32"] == 1.0  # the very weights, in fp32
    for bits, gguf in E.GGUF_TYPES.items():
        row = rows[f"llama.cpp {gguf}"]
        assert row["bits"] == bits and row["speed_vs_kit_same_bits"] > 0 and row["gguf"].endswith(".gguf")
    assert rec.config["targets"]["llama.cpp F32 / kit fp32 batch-1 decode"]["value"] is not None


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LABKIT_VLLM_PYTHON"), reason="set LABKIT_VLLM_PYTHON to a Python with vllm-cpu")
def test_vllm_serves_the_same_load_and_the_same_greedy_text():
    rec = Record("engines")
    E._serving(rec, E.Config.smallest(), ["float32"], os.environ["LABKIT_VLLM_PYTHON"], params=134_515_072)
    rows = {v["name"]: v for v in rec.variants}
    assert set(rows) == {"labkit serve fp32", "vllm-cpu fp32"}
    assert rows["vllm-cpu fp32"]["same_greedy_text_as_labkit"] is True
    assert rows["labkit serve fp32"]["speed_vs_vllm_same_dtype"] > 0
    work = E.workload(E.Config.smallest())  # the same requests to both: known, so prompt tokens count too
    assert len(work) == 4 and all(8 <= len(p) <= 16 and 2 <= n <= 4 for p, n in work)
    for row in rows.values():
        assert row["total_tokens_per_s"] > row["output_tokens_per_s"] and 0 < row["pct_of_gemm_ceiling"] < 100
