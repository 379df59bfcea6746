import json
import os

import pytest

from labkit import LabkitError, cli, report, results


def _rec():
    r = results.Record("demo", config={"k": 1}, env={"cpu": "x"})
    r.add("fp32", model="m", weight_bytes=400, perplexity=10.0)
    r.add("int8", model="m", weight_bytes=100, perplexity=10.1)
    return r


def test_record_roundtrip_and_frame(tmp_path):
    path = _rec().save(tmp_path)
    assert path.name == "demo.json"
    d = json.loads(path.read_text())
    assert set(d) == {"experiment", "variants", "config", "env", "created_at", "labkit_version"}
    back = results.load(path)
    df = back.to_frame()
    assert list(df.columns[:2]) == ["model", "name"] and len(df) == 2
    assert back.variant("int8")["weight_bytes"] == 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_duplicate_variant_rejected():
    r = _rec()
    with pytest.raises(LabkitError, match="already"):
        r.add("fp32", model="m")


def test_save_is_atomic_on_failure(tmp_path):
    r = _rec()
    r.save(tmp_path)
    before = (tmp_path / "demo.json").read_text()
    r.config["bad"] = object.__new__(type("Unjsonable", (), {}))
    with pytest.raises(TypeError, match="a record cannot hold a Unjsonable"):  # not a silent str() of it
        r.save(tmp_path)
    assert (tmp_path / "demo.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_dir_reported(tmp_path):
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    with pytest.raises(LabkitError, match="not writable"):
        results.ensure_writable(d)


def test_unwritable_dir_reported_before_work(capsys):
    assert cli.main(["run", "baseline", "--out", "/proc/labkit"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err


def test_unknown_experiment_lists_known(capsys):
    assert cli.main(["run", "nope"]) == 2
    assert "known experiments: baseline" in capsys.readouterr().err


def test_report_embeds_table_and_figure(tmp_path):
    _rec().save(tmp_path / "results")
    out = report.build(tmp_path / "results", tmp_path / "reports" / "index.html")
    html = out.read_text()
    assert "<h2>demo</h2>" in html and "int8" in html and "data:image/png;base64," in html


def test_report_without_records_says_what_to_do(tmp_path):
    with pytest.raises(LabkitError, match="labkit run"):
        report.build(tmp_path, tmp_path / "index.html")


def test_report_speaks_human_units_and_links_rendered_notebooks(tmp_path):
    rec = results.Record("pruning")
    rec.add("dense", model="m", weight_bytes=86184, accuracy=0.975, latency_ms_median=2.36, latency_ms_iqr=0.09,
            speedup_vs_baseline=1.0)
    rec.add("small", model="m", weight_bytes=30572, accuracy=0.975, latency_ms_median=1.47, latency_ms_iqr=0.06,
            speedup_vs_baseline=1.6)
    rec.config = {"targets": {"t": {"ok": True}, "u": {"ok": False}}}
    rec.save(tmp_path / "results")
    out = report.build(tmp_path / "results", tmp_path / "reports" / "index.html")
    html = out.read_text()
    assert "86.2 kB" in html and "1.47 ms ± 0.06" in html and "1.60×" in html and "97.5 %" in html
    assert "Fastest at baseline quality: <b>m small</b>" in html and "1 of 2 targets met" in html
    assert "notebook: notebooks/02_pruning.ipynb" in html and "<a href" not in html.split("<nav>")[1].split("</nav>")[1]
    (tmp_path / "reports" / "notebooks").mkdir()
    (tmp_path / "reports" / "notebooks" / "02_pruning.html").write_text("<html></html>")
    html = report.build(tmp_path / "results", tmp_path / "reports" / "index.html").read_text()
    assert 'executed notebook: <a href="notebooks/02_pruning.html">' in html


def test_records_store_scalars_paths_dtypes_and_devices():
    import numpy as np
    import torch

    r = results.Record("demo", config={"a": np.float32(1.5), "b": torch.tensor(3), "p": results.Path("x/y"),
                                       "d": torch.bfloat16, "dev": torch.device("cpu"), "s": {"b", "a"}})
    assert results.Record.from_dict(json.loads(json.dumps(r.to_dict(), default=results._jsonable))).config == {
        "a": 1.5, "b": 3, "p": "x/y", "d": "torch.bfloat16", "dev": "cpu", "s": ["a", "b"]}


def test_report_escapes_every_field_a_record_carries(tmp_path):
    rec = results.Record("demo<script>")
    rec.add("<img src=x onerror=alert(1)>", model="m&m", weight_bytes=10, note="</td><script>alert(2)</script>")
    rec.save(tmp_path / "results")
    html = report.build(tmp_path / "results", tmp_path / "reports" / "index.html").read_text()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "m&amp;m" in html and "demo&lt;script&gt;" in html


def test_report_answers_one_question_per_table():
    """The quantization record mixes five models (three measured, two projected) and a batch sweep: each table
    holds one model and answers one question, with no row that leaves the question's columns empty."""
    rec, _ = results.load_reference("quantization", "cpu-epyc-2core")
    tables = report.questions(rec)
    asked = {(t["question"], t["model"]) for t in tables}
    assert len(asked) == len(tables)  # one table per (question, model)
    assert ("What does it cost?", "smollm2-135m by batch") not in asked  # the sweep has no memory column
    assert ("How fast is it?", "smollm2-135m by batch") in asked
    for t in tables:
        assert t["head"][0] == "variant"
        for row in t["rows"]:
            assert any(cell for cell in row[1:]), (t["question"], t["model"], row)
    models = {t["model"] for t in tables}
    assert {"smollm2-135m", "minilm-l6"} <= models
