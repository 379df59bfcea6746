"""labkit grade: a cohort built here — right, partly right, empty, raising, hanging, memory-hungry, reaching
outside its directory — graded once; every grade and message checked."""

import csv
import json

import nbformat
import pytest

from labkit import LabkitError, exercises, zoo
from labkit.cli import main
from labkit.grading import check_gradescope, grade

IMPORTS = "from labkit import exercises\nimport torch"
PACK = '''def pack_int4(codes):
    c = codes.reshape(-1).to(torch.uint8)
    return (c[0::2] | (c[1::2] << 4)).to(torch.uint8)
pack_int4 = exercises.check("pack_int4", pack_int4)'''
UNPACK = '''def unpack_int4(packed):
    p = packed.reshape(-1)
    return torch.stack([p & 15, p >> 4], dim=1).reshape(-1)
unpack_int4 = exercises.check("unpack_int4", unpack_int4)'''
# right on every case but the one with exactly two codes (1 of pack_int4's 3 cases wrong)
PARTLY = '''def pack_int4(codes):
    c = codes.reshape(-1).to(torch.uint8)
    out = (c[0::2] | (c[1::2] << 4)).to(torch.uint8)
    return out if c.numel() > 2 else out + 1
pack_int4 = exercises.check("pack_int4", pack_int4)'''
COHORT = {
    "alice": [IMPORTS, PACK, UNPACK],
    "bob": [IMPORTS, PARTLY, "unpack_int4 = exercises.check('unpack_int4', lambda p: p)"],
    "carol": [IMPORTS],
    "dave": [IMPORTS, "raise ValueError('oops')", PACK],
    "erin": [IMPORTS, PACK, "import time\nwhile True:\n    time.sleep(0.5)", UNPACK],
    "frank": [IMPORTS, "x = torch.ones(2**31, dtype=torch.float64)", PACK],
    "gina": [IMPORTS, "open({escape!r}, 'w').write('x')", "import shutil; shutil.rmtree({victim!r})", PACK,
             "import os\ncache = os.environ['LABKIT_CACHE']\nassert os.listdir(cache)  # the models: readable\n"
             "open(os.path.join(cache, 'planted.txt'), 'w')"],
    "hal": [IMPORTS, "print(open({other!r}).read()[:20])", "import urllib.request\n"
            "urllib.request.urlopen('http://example.com', timeout=2)", "import subprocess\nsubprocess.run(['ls'])",
            "exercises.check('no_such_exercise', len)", "pack_int4 = exercises.check('pack_int4', "
            "exercises.solution('pack_int4'))", "import labkit.quant.exercise as solutions\n"
            "print(open(solutions.__file__).read()[:20])"],
    # writes malformed lines into the grade log (it lies in her directory): points above the maximum, a string for
    # points, a missing message, a maximum of her own; then checks pack_int4 for real
    "ivy": [IMPORTS, "import json, os\nwith open(os.environ['LABKIT_GRADE_LOG'], 'a') as f:\n"
            "    for e in ({'name': 'pack_int4', 'ok': True, 'points': 5, 'max_points': 1, 'message': 'a'},\n"
            "              {'name': 'unpack_int4', 'ok': True, 'points': 'lots', 'max_points': 1, 'message': 'b'},\n"
            "              {'name': 'unpack_int4', 'ok': True, 'points': 1, 'max_points': 1},\n"
            "              {'name': 'unpack_int4', 'ok': True, 'points': 9, 'max_points': 9, 'message': 'c'}):\n"
            "        f.write(json.dumps(e) + '\\n')", PACK],
}


def _write(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    subs, out, victim = root / "subs", root / "out", root / "victim"
    subs.mkdir()
    victim.mkdir()
    (victim / "keep.txt").write_text("still here")
    fills = {"escape": str(root / "escaped.txt"), "victim": str(victim), "other": str(subs / "alice.ipynb")}
    for name, cells in COHORT.items():
        _write(subs / f"{name}.ipynb", [c.format(**fills) if "{" in c and name in ("gina", "hal") else c
                                        for c in cells])
    (subs / "ivan.ipynb").write_text("not json")
    other = root / "elsewhere"
    other.mkdir()
    _write(other / "alice.ipynb", [IMPORTS])  # a second "alice": a duplicate learner name
    rc = main(["grade", str(subs), str(other / "alice.ipynb"), "--out", str(out), "--lesson", "01b",
               "--cell-timeout", "8", "--memory-mb", "3072", "--gradescope"])
    rows = {r["learner"] + ("#dup" if "duplicate" in r["status"] else ""): r
            for r in json.loads((out / "grades.json").read_text())}
    return rc, rows, out, root


def test_every_learner_has_a_row_and_the_grades_are_right(graded):
    rc, rows, out, _ = graded
    assert rc == 0
    assert set(rows) == set(COHORT) | {"ivan", "alice#dup"}
    ex = {n: {k: v["points"] for k, v in r["exercises"].items()} for n, r in rows.items()}
    assert list(ex["alice"]) == exercises.available("01b")
    assert ex["alice"]["pack_int4"] == 1 and ex["alice"]["unpack_int4"] == 1
    assert ex["bob"]["pack_int4"] == pytest.approx(2 / 3, abs=1e-3) and ex["bob"]["unpack_int4"] == 0
    assert "(2 of 3 cases right)" in rows["bob"]["exercises"]["pack_int4"]["message"]
    assert all(v == 0 for v in ex["carol"].values())
    assert rows["carol"]["exercises"]["pack_int4"]["message"].startswith("not attempted")
    assert ex["dave"]["pack_int4"] == 1 and rows["dave"]["errors"] == [{"cell": 2, "error": "ValueError: oops"}]
    with open(out / "grades.csv") as f:
        table = {r["learner"]: r for r in csv.DictReader(f)}
    assert float(table["alice"]["total"]) == 2 and float(table["bob"]["total"]) == pytest.approx(2 / 3, abs=1e-3)
    assert "alice" in (out / "feedback" / "alice.html").read_text()


def test_a_hang_a_memory_hog_and_a_bad_file_cost_only_their_own_rows(graded):
    _, rows, _, _ = graded
    erin = rows["erin"]
    assert "cell 3 ran past 8 s" in erin["status"]
    assert erin["exercises"]["pack_int4"]["points"] == 1 and erin["exercises"]["unpack_int4"]["points"] == 0
    frank = rows["frank"]
    assert any("allocate" in e["error"] for e in frank["errors"]), frank
    assert frank["exercises"]["pack_int4"]["points"] == 1  # the notebook went on after the failed allocation
    assert rows["ivan"]["status"].startswith("not a notebook")
    assert "duplicate learner name 'alice'" in rows["alice#dup"]["status"]


def test_reaching_outside_is_refused_and_said(graded):
    _, rows, _, root = graded
    assert not (root / "escaped.txt").exists() and (root / "victim" / "keep.txt").exists()
    gina = [e["error"] for e in rows["gina"]["errors"]]
    assert "PermissionError" in gina[0] and "outside the submission's directory" in gina[0]
    assert "PermissionError" in gina[1]
    assert "planted.txt" in gina[2] and "outside the submission's directory" in gina[2] and len(gina) == 3
    assert not (zoo.cache_dir() / "planted.txt").exists()
    assert rows["gina"]["exercises"]["pack_int4"]["points"] == 1
    hal = [e["error"] for e in rows["hal"]["errors"]]
    assert "reading" in hal[0] and "alice.ipynb" in hal[0]  # another learner's submission
    assert "no network while grading" in hal[1]
    assert "starting a process" in hal[2]
    assert "no_such_exercise" in hal[3] and "does not exist" in hal[3]
    assert "reading" in hal[4] and "quant/exercise.py" in hal[4]  # the kit's solutions
    assert rows["hal"]["exercises"]["pack_int4"] == {**rows["hal"]["exercises"]["pack_int4"], "points": 0}
    assert "kit's own function" in rows["hal"]["exercises"]["pack_int4"]["message"]


def test_a_malformed_grade_log_costs_its_learner_only(graded):
    """Every entry is validated: the four malformed ones are dropped and said in ivy's row; her real check counts;
    the cohort's files are all written (checked by the tests above)."""
    _, rows, out, _ = graded
    ivy = rows["ivy"]
    dropped = [e["error"] for e in ivy["errors"] if "malformed grade-log entry" in e["error"]]
    assert len(dropped) == 4, ivy["errors"]
    assert "above max_points" in dropped[0] and "points" in dropped[1] and "message" in dropped[2]
    assert "every exercise is worth 1.0" in dropped[3]
    assert ivy["exercises"]["pack_int4"]["points"] == 1 and ivy["exercises"]["unpack_int4"]["points"] == 0
    assert json.loads((out / "gradescope" / "ivy" / "results.json").read_text())["score"] == 1


def test_grading_in_parallel_gives_the_same_grades(tmp_path):
    """--jobs 2 and --jobs 1 on the same submissions: the same rows (each notebook is graded alone)."""
    subs = tmp_path / "subs"
    subs.mkdir()
    for name in ("alice", "bob", "carol"):
        _write(subs / f"{name}.ipynb", COHORT[name])
    one = grade([subs], tmp_path / "one", lesson="01b", cell_timeout=60, memory_mb=3072, jobs=1, progress=False)
    two = grade([subs], tmp_path / "two", lesson="01b", cell_timeout=60, memory_mb=3072, jobs=2, progress=False)
    assert [r.__dict__ for r in one] == [r.__dict__ for r in two]
    assert (tmp_path / "one" / "grades.csv").read_text() == (tmp_path / "two" / "grades.csv").read_text()
    with pytest.raises(LabkitError, match="jobs=0"):
        grade([subs], jobs=0)


def test_a_kernel_that_fails_to_start_is_started_again(tmp_path, monkeypatch):
    """The first kernel dies before answering (as a kernel can on a loaded machine): the worker starts a second and
    grades the notebook; when every start fails, the status says the kernel did not start, not that a cell failed."""
    import contextlib

    import nbclient

    from labkit.grading import worker

    starts = []

    class FlakyClient(nbclient.NotebookClient):
        failures = 1

        @contextlib.contextmanager
        def setup_kernel(self, **kwargs):
            starts.append(1)
            if len(starts) <= self.failures:
                raise RuntimeError("Kernel died before replying to kernel_info")
            with super().setup_kernel(**kwargs):
                yield

    monkeypatch.setattr(nbclient, "NotebookClient", FlakyClient)
    monkeypatch.setenv("LABKIT_GRADE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "nb.ipynb", ["print(1 + 1)", "raise ValueError('oops')"])
    out = worker.run(tmp_path / "nb.ipynb", tmp_path / "result.json", 60)
    assert len(starts) == 2 and out["status"].startswith("ran to the end; 1 cell(s) raised")
    assert out["errors"] == [{"cell": 2, "error": "ValueError: oops"}]
    starts.clear()
    FlakyClient.failures = worker.KERNEL_STARTS
    with pytest.raises(RuntimeError, match="starting the kernel: Kernel died"):
        worker.run(tmp_path / "nb.ipynb", tmp_path / "result.json", 60)
    assert len(starts) == worker.KERNEL_STARTS


def test_gradescope_results_have_gradescopes_shape(graded):
    _, rows, out, _ = graded
    results = json.loads((out / "gradescope" / "bob" / "results.json").read_text())
    check_gradescope(results)
    assert results["score"] == pytest.approx(2 / 3, abs=1e-3)
    assert [t["name"] for t in results["tests"]] == exercises.available("01b")
    with pytest.raises(LabkitError, match="score outside"):
        check_gradescope({"tests": [{"name": "x", "score": 2, "max_score": 1}]})
    with pytest.raises(LabkitError, match="visibility"):
        check_gradescope({"tests": [], "visibility": "sometimes"})


def test_bad_input_is_named(tmp_path):
    with pytest.raises(LabkitError, match="holds no .ipynb"):
        grade([tmp_path])
    with pytest.raises(LabkitError, match="does not exist"):
        grade([tmp_path / "nope.ipynb"])
    with pytest.raises(LabkitError, match="lesson='99'"):
        grade([tmp_path], lesson="99")
    with pytest.raises(LabkitError, match="memory_mb=10"):
        grade([tmp_path], memory_mb=10)


def test_partial_points_without_a_kernel():
    """The scoring alone: a checker's cases are judged one by one, a stub scores 0, a right function full."""
    import torch

    def partly(codes):
        out = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)
        return out if codes.numel() > 2 else out + 1

    v = exercises.verify("pack_int4", partly)
    assert not v.ok and v.points == pytest.approx(2 / 3, abs=1e-3) and "2 of 3 cases right" in v.message
    assert exercises.verify("pack_int4", exercises.solution("pack_int4")).points == 1
    stub = exercises.verify("pack_int4", lambda codes: (_ for _ in ()).throw(NotImplementedError))
    assert stub.points == 0 and "not written yet" in stub.message


def test_feedback_pages_escape_names_and_messages(tmp_path):
    from labkit.grading import Submission, write

    row = Submission("<script>alert(1)</script>", "x.ipynb", exercises={
        "pack_int4": {"points": 0.5, "max_points": 1.0, "message": "got <b>wrong</b> & more", "cell": 3}},
        errors=[{"cell": 4, "error": "<img src=x onerror=alert(2)>"}])
    row.learner = "eve"  # the file name stays safe; the page title and heading carry the raw name below
    write([row], tmp_path)
    page = (tmp_path / "feedback" / "eve.html").read_text()
    row.learner = "<script>alert(1)</script>"
    from labkit.grading import _feedback

    page += _feedback(row)
    assert "<script>" not in page and "<img" not in page and "<b>wrong</b>" not in page
    assert "got &lt;b&gt;wrong&lt;/b&gt; &amp; more" in page and "0.5 / 1" in page and "cell 4:" in page
