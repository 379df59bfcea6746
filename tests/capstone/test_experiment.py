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
