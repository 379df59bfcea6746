"""The serving experiment end to end on the real model, at a tiny size (the full quick run is a benchmark)."""

import pytest


@pytest.mark.slow
def test_serving_experiment_small(tmp_path):
    from labkit.experiments import serving

    cfg = serving.Config(num_requests=5, prompt_len=(8, 40), output_len=(3, 10), static_batch_sizes=(0,))
    rec = serving.run(cfg, progress=False)
    names = [v["name"] for v in rec.variants]
    assert names == ["hf-sequential", "hf-static", "hf-continuous", "labkit-contiguous", "labkit-paged",
                     "labkit-paged-preempt"]
    for n in ("labkit-contiguous", "labkit-paged", "labkit-paged-preempt"):
        v = rec.variant(n)
        assert v["matches_reference"], n
        assert v["output_tokens"] == rec.variant("hf-sequential")["output_tokens"]
    assert rec.variant("labkit-paged")["kv_waste_pct"] < rec.variant("labkit-contiguous")["kv_waste_pct"]
    assert rec.variant("labkit-paged-preempt")["preemptions"] > 0
    rec.save(tmp_path)
