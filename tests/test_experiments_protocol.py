"""The experiment protocol: every experiment is found by itself and keeps the contract (notebook, targets, figures),
targets are data checked the same way everywhere, and a new experiment needs nothing but its own module."""

import dataclasses
import sys
import textwrap
from pathlib import Path

import pytest

from labkit import LabkitError, data, experiments, measure, report, results, select
from labkit import export as X
from labkit.experiments import protocol
from labkit.experiments.protocol import Target, check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", experiments.available())
def test_every_experiment_keeps_the_contract(name):
    mod = experiments.get(name)
    missing = [a for a in protocol.REQUIRED if not hasattr(mod, a)]
    assert not missing, f"{name} lacks {missing}"
    assert (ROOT / "notebooks" / f"{mod.NOTEBOOK}.ipynb").exists()
    assert mod.TARGETS and all(isinstance(t, Target) for t in mod.TARGETS)
    assert len({t.key for t in mod.TARGETS}) == len(mod.TARGETS)
    assert dataclasses.is_dataclass(mod.Config)
    assert isinstance(mod.Config.quick(), mod.Config) and isinstance(mod.Config.smallest(), mod.Config)
    assert not hasattr(mod, "GPU_CHECK")  # lent machines are scripts/gpu_check.py's business alone


# Targets an open issue sets that the newest reference record does not meet yet (the report says "not met"): issue 19's
# decode speed-ups of the fused int8/int4 kernels over fp32 at batch 1, in HF's loop (1.13x and 1.18x in the 2-core Xeon
# record) and in the kit's static loop with stacked projections (1.29x and 1.50x).
# Targets the newest reference record misses. Quantization's four speed targets were met in the AMD EPYC record of
# 2026-12-04 (the older Xeon record, in cpu-xeon-2core/, misses all four: they hold on one host, not on every host).
# Serving (issue 38, Xeon record of 2026-12-06): transformers 5's continuous batching, at fp32 like labkit-paged, now
# serves the quick workload as fast as the kit's engine (141.7 vs 135.3 tok/s, min-max ranges overlapping); the
# kit's fast path (bf16, prepacked: 248.5) is not compared with an fp32 baseline, so this stays open until HF's batching
# has a bf16 row too.
# Quantization (Xeon record of 2026-12-06; the four speed targets were met in the EPYC record of 2026-12-04): on this
# AMX host fp32 itself is fast, so the int8/int4 kernels' ratios over it are lower (HF loop int8 1.19x, int4-g128
# 1.53x; static loop int8 1.31x; int4-g128 1.81x holds). bf16 with prepacked weights, the new row, gives 1.30x.
OPEN_GOALS: dict[str, set[str]] = {
    "engines": {"llama.cpp Q8_0 / kit int8 batch-1 decode", "llama.cpp Q4_1 / kit int4-g128 batch-1 decode",
                "labkit serve / vLLM CPU output tok/s at bfloat16"},
    "serving": {"labkit-paged output tok/s / the better HF batching"},
    "quantization": {"smollm2-135m/int8/speedup_vs_baseline", "smollm2-135m/int4-g128/speedup_vs_baseline"},
}


@pytest.mark.parametrize("name", experiments.available())
def test_reference_records_meet_their_targets_and_draw(name):
    """Each experiment's newest reference record (the one notebooks show): its stored targets are what TARGETS says
    of it now (recomputed by tools/recheck_records.py when TARGETS change), every one it can measure holds, and it
    has figures."""
    ref = results.load_reference(name)
    assert ref is not None, f"no reference record for {name}"
    rec, _ = ref
    mod = experiments.get(name)
    got = check(rec, mod.TARGETS)
    assert rec.config["targets"] == got
    unmet = {key for key, t in got.items() if t["ok"] is False}
    assert unmet == OPEN_GOALS.get(name, set()), got  # a goal met moves out of OPEN_GOALS; nothing else may fail
    assert mod.figures(rec)


def test_every_notebook_has_an_experiment_and_every_experiment_a_notebook():
    assert experiments.available() == sorted(experiments.available(), key=experiments.notebook)
    taught = {experiments.notebook(n) for n in experiments.available()}
    stems = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert taught <= stems  # every experiment's notebook exists
    assert {s[:2] for s in stems} == {s[:2] for s in taught}  # every lesson (its parts: 01a..01d) has an experiment


def _rec() -> results.Record:
    rec = results.Record("demo", config={"llm": "m"})
    rec.add("fp32", model="m", perplexity=10.0, weight_bytes=400)
    rec.add("int8", model="m", perplexity=10.05, weight_bytes=100)
    return rec


def test_targets_are_checked_and_absent_variants_are_not_measured():
    rec = _rec()
    ratio = lambda name: lambda r: r.variant(name, "m")["perplexity"] / r.variant("fp32", "m")["perplexity"]  # noqa: E731
    got = check(rec, [Target("{llm}/int8 perplexity ratio", ratio("int8"), 1.01, "max"),
                      Target("int8 bytes", lambda r: r.variant("int8")["weight_bytes"], 200, "min"),
                      Target("int4 perplexity ratio", ratio("int4"), 1.1, "max"),
                      Target("nothing", lambda r: None, 1.0)])
    assert got["m/int8 perplexity ratio"] == {"value": pytest.approx(1.005), "limit": 1.01, "kind": "max", "ok": True}
    assert got["int8 bytes"]["ok"] is False
    assert got["int4 perplexity ratio"] == {"value": None, "limit": 1.1, "kind": "max", "ok": None}
    assert got["nothing"]["ok"] is None


def test_a_target_bug_is_not_hidden_as_not_measured():
    with pytest.raises(KeyError):
        check(_rec(), [Target("typo", lambda r: r.variant("int8")["perplexty"], 1.0)])


def test_bad_target_kind_names_the_value():
    with pytest.raises(ValueError, match="kind='at most'"):
        Target("x", lambda r: 1.0, 1.0, "at most")


def test_speedups_are_one_ratio_of_medians():
    rows = {"a": {"latency_ms_median": 10.0, "tok_s": 5.0}, "b": {"latency_ms_median": 4.0, "tok_s": 20.0}}
    assert measure.speedups(rows, "a") == {"a": 1.0, "b": 2.5}
    assert measure.speedups(rows, "a", "tok_s", higher_is_better=True) == {"a": 1.0, "b": 4.0}
    with pytest.raises(LabkitError, match="baseline='c'.*a, b"):
        measure.speedups(rows, "c")


def test_compare_latency_gives_speedups_against_the_named_baseline():
    lat = measure.compare_latency({"x": lambda: sum(range(1000)), "y": lambda: None}, repeats=3, baseline="x")
    assert lat["x"]["speedup_vs_baseline"] == 1.0
    assert lat["y"]["speedup_vs_baseline"] == lat["x"]["latency_ms_median"] / lat["y"]["latency_ms_median"]
    with pytest.raises(LabkitError, match="baseline='z'"):
        measure.compare_latency({"x": lambda: None}, baseline="z")


def test_keeps_quality_is_one_rule():
    base = {"accuracy": 0.975, "perplexity": 17.0}
    assert select.keeps_quality({"accuracy": 0.96}, base) and not select.keeps_quality({"accuracy": 0.959}, base)
    assert select.keeps_quality({"perplexity": 18.7}, base) and not select.keeps_quality({"perplexity": 18.8}, base)
    assert select.keeps_quality({"perplexity": 30.0}, base, {**select.KEEPS_QUALITY, "perplexity": 1.0})
    assert select.keeps_quality({"tokens_per_s": 3.0}, base)  # no shared quality metric: nothing lost
    from labkit.capstone import experiment as capstone

    cfg = capstone.Config()
    assert (cfg.within_accuracy, cfg.within_perplexity) == (select.KEEPS_QUALITY["accuracy"],
                                                            select.KEEPS_QUALITY["perplexity"])


def test_batch_and_calibration_helpers():
    x = data.digits_splits()["test"][0]
    b = data.repeat_to(x, 2 * len(x) + 3)
    assert b.shape[0] == 2 * len(x) + 3 and (b[len(x):2 * len(x)] == x).all()
    feeds = X.calibration_feeds(x, 2)
    assert [f["images"].shape[0] for f in feeds] == [64, 64] and (feeds[1]["images"] == x[64:128].numpy()).all()
    with pytest.raises(LabkitError, match="batches=0"):
        X.calibration_feeds(x, 0)
    with pytest.raises(LabkitError, match="n=0"):
        data.repeat_to(x, 0)


NEW_EXPERIMENT = '''
"""A made-up technique, added the way README's Contributing says: one new folder."""
from dataclasses import asdict, dataclass

from labkit import env
from labkit.experiments.protocol import Target, check
from labkit.results import Record

NAME = "new_technique"
NOTEBOOK = "99_new_technique"


@dataclass
class Config:
    scale: float = 2.0
    device: str = "cpu"

    @classmethod
    def quick(cls):
        return cls()

    @classmethod
    def smallest(cls):
        return cls(scale=1.5)


def run(config=None, progress=True):
    config = config or Config()
    rec = Record("new_technique", env=env.describe())
    rec.add("baseline", model="toy", tokens_per_s=10.0, speedup_vs_baseline=1.0)
    rec.add("new", model="toy", tokens_per_s=10.0 * config.scale, speedup_vs_baseline=config.scale)
    rec.config = asdict(config)
    rec.config["targets"] = check(rec, TARGETS)
    return rec


TARGETS = [Target("new speedup_vs_baseline", lambda r: r.variant("new")["speedup_vs_baseline"], 1.5)]


def figures(rec):
    from labkit.viz.plots import metric_bars

    return [metric_bars(rec, "tokens_per_s")]
'''


def test_a_new_technique_is_one_new_folder(tmp_path, monkeypatch):
    """Add a folder with an experiment module beside labkit's own: the CLI runs it, the report orders, links and
    draws it, the GPU check gives it a slot."""
    import labkit

    pkg = tmp_path / "extra" / "newtech"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A made-up technique."""\n')
    (pkg / "experiment.py").write_text(textwrap.dedent(NEW_EXPERIMENT))
    monkeypatch.setattr(labkit, "__path__", [*labkit.__path__, str(tmp_path / "extra")])
    experiments.clear()
    try:
        assert experiments.available()[-1] == "new_technique"
        import importlib.util

        spec = importlib.util.spec_from_file_location("gpu_check_with_new", ROOT / "scripts" / "gpu_check.py")
        gc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gc)
        assert gc.PARTS["compress"][-1] == "new_technique"
        assert gc.ESTIMATE_S["new_technique"] == gc.NEW_EXPERIMENT_SLOT[1]
        assert set(gc.SLOTS) <= set(experiments.available())  # no slot for an experiment that is gone
        from labkit import cli

        assert cli.main(["run", "new_technique", "--quick", "--out", str(tmp_path / "results")]) == 0
        rec = results.load(tmp_path / "results" / "new_technique.json")
        assert rec.config["targets"]["new speedup_vs_baseline"]["ok"]
        html = report.build(tmp_path / "results", tmp_path / "index.html").read_text()
        assert 'id="new_technique"' in html and "notebooks/99_new_technique.ipynb" in html
        assert "1 of 1 targets met" in html and "data:image/png;base64" in html
    finally:
        monkeypatch.undo()
        experiments.clear()
        sys.modules.pop("labkit.newtech.experiment", None)
        sys.modules.pop("labkit.newtech", None)
