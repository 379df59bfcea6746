"""The serving experiment end to end on the real model, at a tiny size (the full quick run is a benchmark)."""

import pytest


@pytest.mark.slow
def test_serving_experiment_small(tmp_path):
    from labkit.serve import experiment_serving as serving

    cfg = serving.Config(num_requests=5, prompt_len=(8, 40), output_len=(3, 10), static_batch_sizes=(2, 0),
                         repeats=3, warmup_requests=2)
    rec = serving.run(cfg, progress=False)
    from labkit import env

    names = [v["name"] for v in rec.variants]
    native = env.bf16_native("cpu")
    assert names == ["hf-sequential", "hf-static", "hf-continuous"] + ["hf-continuous-bf16"] * native + [
                     "labkit-contiguous", "labkit-contiguous-exact",
                     "labkit-paged", "labkit-paged-preempt", "labkit-paged-int8kv", "labkit-paged-separate"] \
        + ["labkit-paged-bf16"] * native + ["labkit-paged-prepacked"] + ["labkit-paged-bf16-prepacked"] * native
    for v in rec.variants:  # bf16 only where it is native: emulated it is slower than fp32
        assert v["dtype"] == ("bfloat16" if "bf16" in v["name"] else "float32")
        assert v["matches_reference"] or v["name"] in ("labkit-paged-int8kv", "labkit-paged-bf16",
                                                       "labkit-paged-bf16-prepacked", "hf-continuous-bf16"), v["name"]
        assert v["matches_reference"] == (v["token_agreement"] == 1.0)
        assert v["output_tokens"] == rec.variant("hf-sequential")["output_tokens"]
        assert len(v["ttft_ms_per_request"]) == 5
        if v["name"] != "hf-sequential":
            assert v["repeats"] == 3 and len(v["output_tokens_per_s_runs"]) == 3
            assert v["output_tokens_per_s_min"] <= v["output_tokens_per_s"] <= v["output_tokens_per_s_max"]
    assert set(rec.config["hf_static_tried"]) == {2, 5}
    best = max(rec.variant(n)["output_tokens_per_s"] for n in ("hf-static", "hf-continuous"))
    assert (
        rec.variant("labkit-paged")["speedup_vs_baseline"] == rec.variant("labkit-paged")["output_tokens_per_s"] / best
    )
    assert rec.variant("labkit-paged")["kv_waste_pct"] < rec.variant("labkit-contiguous-exact")["kv_waste_pct"] \
        < rec.variant("labkit-contiguous")["kv_waste_pct"]
    assert rec.variant("labkit-paged-preempt")["preemptions"] > 0
    # SmolLM2: 30 layers x 3 KV heads x 64 dims, K and V; fp32 = 4 bytes each, int8 = 1 byte + an fp16 scale a head
    assert rec.variant("labkit-paged")["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert rec.variant("labkit-paged-int8kv")["kv_bytes_per_token"] == 2 * 30 * 3 * (64 + 2)
    assert rec.variant("labkit-paged-separate")["stack_projections"] is False
    if native:  # half the KV bytes a token, and the same greedy text for most of its tokens
        assert rec.variant("labkit-paged-bf16")["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2
        assert rec.variant("labkit-paged-bf16")["token_agreement"] > 0.3
        assert rec.variant("hf-continuous-bf16")["token_agreement"] > 0.3  # transformers in bf16: the same format
    assert rec.config["targets"]["labkit-paged-int8kv KV bytes a token / labkit-paged"]["ok"]
    rec.save(tmp_path)


def test_batch_sweep_reports_decode_speed_beside_the_ceilings(tokenizer):
    from labkit.serve.experiment_serving import batch_sweep
    from tests.conftest import tiny_llama

    rows = batch_sweep(tiny_llama(seed=2), tokenizer, [1, 3], prompt_len=8, new_tokens=5, repeats=2)
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["ceiling_tok_s"] == min(r["memory_bound_tok_s"], r["compute_bound_tok_s"])
    assert rows[1]["memory_bound_tok_s"] == pytest.approx(3 * rows[0]["memory_bound_tok_s"])
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_sweep(None, None, [0])
