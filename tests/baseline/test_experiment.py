"""The baseline experiment end to end on the real model (quick sizes)."""

import json

import pytest

from labkit import cli

SMOLLM2_PARAMS = 134_515_008


@pytest.mark.slow
def test_run_baseline_quick_twice_is_reproducible(tmp_path, capsys):
    assert cli.main(["run", "baseline", "--quick", "--out", str(tmp_path / "a")]) == 0
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
