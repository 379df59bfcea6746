"""The capstone pipeline at a small size: stages in order, recipes that accumulate, fronts and decisions."""

from labkit.capstone import experiment as capstone


def test_cnn_pipeline_stages_recipes_and_decisions():
    cfg = capstone.Config.quick()
    cfg.run_lm, cfg.distill_epochs, cfg.finetune_epochs, cfg.repeats = False, 5, 2, 3
    rec = capstone.run(cfg, progress=False)
    names = [v["name"] for v in rec.variants]
    assert names == ["teacher", "distilled", "pruned-finetuned", "onnx-runtime", "onnx-runtime-int8"]
    assert [v["stage"] for v in rec.variants] == [0, 1, 2, 3, 4]
    for prev, cur in zip(rec.variants[1:], rec.variants[2:]):
        assert cur["recipe"][:len(prev["recipe"])] == prev["recipe"]  # each stage builds on the one before
    t, s, p = (rec.variant(n) for n in ("teacher", "distilled", "pruned-finetuned"))
    assert t["params"] == 21546 and s["params"] < t["params"] / 2 and p["params"] < s["params"]
    assert rec.variant("onnx-runtime")["accuracy"] == p["accuracy"]  # ORT fp32 computes the same function
    assert all(isinstance(v["on_pareto_front"], bool) and isinstance(v["on_latency_front"], bool)
               for v in rec.variants)
    smallest = min(rec.variants, key=lambda v: v["weight_bytes"])
    assert smallest["on_pareto_front"]
    assert any("digits-cnn smallest weight_bytes" in k for k in rec.config["decisions"])


def test_the_llm_stages_include_bf16_where_it_is_native():
    import pytest

    from labkit import env

    if not env.bf16_native():
        pytest.skip("bf16 is emulated on this CPU: the capstone has no bf16 row here (by design)")
    rec = capstone.run(capstone.Config.smallest(), progress=False)
    rows = {v["name"]: v for v in rec.variants if v["model"] == rec.config["llm"]}
    assert list(rows) == ["dense", "pruned-recovered", "pruned-recovered-int8", "pruned-recovered-bf16"]
    bf16 = rows["pruned-recovered-bf16"]
    assert bf16["dtype"] == "bfloat16" and bf16["recipe"][-2] == "bf16 weights and activations"
    assert bf16["weight_bytes"] * 2 == rows["pruned-recovered"]["weight_bytes"]  # half the bytes of fp32
    assert bf16["perplexity"] > 0 and bf16["output_tokens_per_s"] > 0
