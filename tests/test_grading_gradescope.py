"""Gradescope, end to end without Gradescope's servers: the autograder zip `labkit export-gradescope` writes is
unpacked into Gradescope's documented layout under a temporary root, its setup.sh runs in a fresh environment that
holds only Python and pip (what Gradescope's Ubuntu image documents), then run_autograder grades a filled-in and
an empty submission; results.json must have Gradescope's schema and the expected scores."""

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from labkit import LabkitError, zoo
from labkit.grading import check_gradescope, gradescope
from tests.test_grading import IMPORTS, PACK, UNPACK
from tests.test_grading import _write as _notebook

ROOT = Path(__file__).resolve().parent.parent
TORCH_HERE = "torch==2.13.0"  # the CPU build on this disk (Gradescope's setup.sh asks torch's CPU index instead)


@pytest.fixture(scope="module")
def autograder(tmp_path_factory) -> Path:
    """/autograder after Gradescope's image build: source/ unzipped, run_autograder copied, setup.sh run."""
    tmp = tmp_path_factory.mktemp("gradescope")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True)
    wheel = next((tmp / "dist").glob(gradescope.WHEEL_GLOB))
    zip_path = gradescope.build("01b", tmp / "autograder.zip", wheel)
    root = tmp / "autograder"
    with zipfile.ZipFile(zip_path) as z:
        assert {"setup.sh", "run_autograder"} <= set(z.namelist())  # at the archive's root, as Gradescope requires
        z.extractall(root / "source")
    for name in ("setup.sh", "run_autograder"):
        (root / "source" / name).chmod(0o755)  # zipfile does not restore modes; Gradescope's unzip does
    shutil.copy2(root / "source" / "run_autograder", root / "run_autograder")
    env_dir = tmp / "python"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_INDEX")}
    env.update(LABKIT_PYTHON=str(env_dir / "bin" / "python"), LABKIT_PIP_ARGS=TORCH_HERE,
               LABKIT_CACHE=str(zoo.cache_dir()))
    r = subprocess.run(["bash", str(root / "source" / "setup.sh")], capture_output=True, text=True, env=env,
                       cwd=root / "source", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _submit(root: Path, cells: list[str] | None) -> dict:
    shutil.rmtree(root / "submission", ignore_errors=True)
    shutil.rmtree(root / "results", ignore_errors=True)
    (root / "submission").mkdir()
    if cells is not None:
        _notebook(root / "submission" / "01b_4bit_storage_and_nf4.ipynb", cells)
    py = root.parent / "python" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(LABKIT_PYTHON=str(py), AUTOGRADER_ROOT=str(root), LABKIT_CACHE=str(zoo.cache_dir()))
    r = subprocess.run([str(root / "run_autograder")], capture_output=True, text=True, env=env, cwd=root,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((root / "results" / "results.json").read_text())
    check_gradescope(results)
    return results


@pytest.mark.slow
def test_a_filled_in_submission_scores_full_marks(autograder):
    results = _submit(autograder, [IMPORTS, PACK, UNPACK])
    tests = {t["name"]: t for t in results["tests"]}
    assert tests["pack_int4"]["score"] == tests["unpack_int4"]["score"] == 1
    assert results["score"] == sum(t["score"] for t in results["tests"]) == 2
    assert all(t["max_score"] == 1 and t["visibility"] == "visible" for t in results["tests"])
    assert "ran to the end" in results["output"]


@pytest.mark.slow
def test_an_empty_submission_and_no_notebook_score_zero(autograder):
    results = _submit(autograder, [IMPORTS])
    assert results["score"] == 0 and all(t["score"] == 0 for t in results["tests"])
    assert all(t["output"].startswith("not attempted") for t in results["tests"])
    nothing = _submit(autograder, None)
    assert nothing["score"] == 0 and "no .ipynb" in nothing["output"]


def test_the_exporter_names_what_is_wrong(tmp_path):
    with pytest.raises(LabkitError, match="lesson='99'"):
        gradescope.build("99", tmp_path / "a.zip", tmp_path / "x.whl")
    with pytest.raises(LabkitError, match="wheel="):
        gradescope.build("01b", tmp_path / "a.zip", tmp_path / "x.whl")
    assert not (tmp_path / "a.zip").exists()
