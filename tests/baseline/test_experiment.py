"""The baseline experiment end to end on the real model (quick sizes)."""

import json

import pytest

from labkit import cli, env

SMOLLM2_PARAMS = 134_515_008


@pytest.mark.slow
def test_run_baseline_quick_twice_is_reproducible(tmp_path, capsys, monkeypatch):
    native = env.bf16_native("cpu")
    assert cli.main(["run", "baseline", "--quick", "--out", str(tmp_path / "a")]) == 0
    monkeypatch.setattr(env, "bf16_native", lambda device=None: False)  # the second run: a host without native bf16
    assert cli.main(["run", "baseline", "--quick", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "baseline.json").read_text())
    b = json.loads((tmp_path / "b" / "baseline.json").read_text())
    llm = next(v for v in a["variants"] if v["model"] == "smollm2-135m")
    assert llm["name"] == "fp32" and llm["params"] == SMOLLM2_PARAMS
    assert abs(llm["weight_bytes"] - SMOLLM2_PARAMS * 4) <= 0.01 * SMOLLM2_PARAMS * 4
    assert 5 < llm["perplexity"] < 40
    assert llm["perplexity"] == next(v for v in b["variants"] if v["model"] == "smollm2-135m")["perplexity"]
    assert llm["tokens_per_s"] > 0 and llm["prefill_tokens_per_s"] > 0
    enc = next(v for v in a["variants"] if v["model"] == "minilm-l6")
    # plus two int64 position / token-type id buffers of 512 entries
    assert enc["params"] == 22_713_216 and enc["weight_bytes"] == 22_713_216 * 4 + 2 * 512 * 8
    assert "wrote" in capsys.readouterr().out
    assert {v["name"] for v in b["variants"]} == {"fp32"}  # emulated bf16 is never offered as a row
    if native:  # the bf16 rows: half the bytes, the same text for the most part, and their speed beside fp32's
        llm16 = next(v for v in a["variants"] if v["name"] == "bf16" and v["model"] == "smollm2-135m")
        enc16 = next(v for v in a["variants"] if v["name"] == "bf16" and v["model"] == "minilm-l6")
        assert llm16["dtype"] == "bfloat16" and abs(llm16["weight_bytes"] / llm["weight_bytes"] - 0.5) < 0.01
        assert 0.98 < llm16["perplexity_ratio"] < 1.05 and llm16["greedy_token_agreement"] > 0.3
        assert llm16["decode_speedup_vs_fp32"] > 0 and llm16["prefill_speedup_vs_fp32"] > 0
        assert enc16["cosine_to_fp32"] > 0.99 and enc16["speedup_vs_fp32"] > 0
        assert a["config"]["auto_dtype"] == "bfloat16"
