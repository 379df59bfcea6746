"""The pruning experiment at a tiny size: every variant and field the record promises, and its targets."""

import pytest
import torch

from labkit.prune import experiment as pruning


def test_cnn_variants_and_targets(tmp_path):
    cfg = pruning.Config.quick()
    cfg.run_lm, cfg.repeats, cfg.sweep_sparsities, cfg.sensitivity_sparsities = False, 3, (0.0, 0.5), (0.5,)
    rec = pruning.run(cfg, progress=False)
    names = [v["name"] for v in rec.variants]
    assert names == ["dense", "unstructured-50", "unstructured-90", "structured-40", "structured-40-finetuned"]
    d = rec.variant("dense")
    for v in rec.variants:
        for key in ("params", "weight_bytes", "macs", "accuracy", "latency_ms_median", "latency_ms_iqr",
                    "speedup_vs_baseline"):
            assert key in v, (v["name"], key)
        assert v["speedup_vs_baseline"] == d["latency_ms_median"] / v["latency_ms_median"]
    u = rec.variant("unstructured-50")
    assert u["weight_bytes"] == d["weight_bytes"] and u["params"] == d["params"]
    assert u["nonzero_weights"] == pytest.approx(d["nonzero_weights"] / 2, rel=0.02)
    s = rec.variant("structured-40-finetuned")
    assert s["params"] == 7643 and s["macs"] < 0.4 * d["macs"]
    assert s["accuracy"] >= rec.variant("structured-40")["accuracy"]
    sweep = rec.config["cnn_sweep"]
    assert {r["method"] for r in sweep} == {"global", "layer", "structured"} and len(sweep) == 6
    t = rec.config["targets"]
    assert t["structured-finetuned params / dense params"]["ok"]
    assert t["digits-cnn unstructured-50 weight_bytes / dense"]["ok"]
    rec.save(tmp_path)


@pytest.mark.slow
def test_lm_variants_small(smollm2):
    cfg = pruning.Config.quick()
    cfg.calib_samples, cfg.recovery_steps, cfg.recovery_batch, cfg.recovery_seq_len = 2, 2, 2, 32
    cfg.ppl_max_windows, cfg.lm_seq_len, cfg.lm_repeats, cfg.new_tokens = 1, 16, 3, 4
    rec = pruning.Record("pruning")
    pruning._lm_variants(rec, cfg, torch.device(cfg.device), progress=False)
    names = [v["name"] for v in rec.variants]
    assert names == ["dense", "unstructured-50", "semi-structured-2:4", "structured-mlp-30",
                     "structured-mlp-30-recovered"]
    d, s = rec.variant("dense"), rec.variant("structured-mlp-30")
    assert s["params"] < d["params"] and s["mlp_intermediate_size"] == 1072
    # 50% global magnitude keeps exactly half the linear weights; 2:4 keeps at most that (some are already 0)
    assert rec.variant("semi-structured-2:4")["nonzero_weights"] <= rec.variant("unstructured-50")["nonzero_weights"]
    r = rec.variant("structured-mlp-30-recovered")
    assert r["recovery_steps"] == 2 and r["recovery_tokens"] == 2 * 2 * 32 and len(r["recovery_loss"]) == 2
    assert all(v["perplexity"] > 1 for v in rec.variants)
