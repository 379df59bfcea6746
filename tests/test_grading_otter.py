"""labkit export-otter: the exercises as Otter-Grader tests, run for real by `otter run` on a filled-in and an
empty notebook; hidden cases on other inputs than the notebook's."""

import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from labkit import LabkitError, exercises
from labkit.cli import main
from labkit.grading import otter

ROOT = Path(__file__).resolve().parents[1]
RANDOM_INPUTS = ["quantize_asymmetric", "dequantize_asymmetric", "pack_int4", "unpack_int4", "double_quantize",
                 "global_magnitude_masks", "hinton_loss", "parity", "append_slot", "paged_attention"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape \
            and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _memorizer(name):
    """The kit's function on the inputs it saw during the notebook's check, an error on any other."""
    kit, seen = exercises.solution(name), []

    def record(*args):
        seen.append([a.detach().clone() if isinstance(a, torch.Tensor) else copy.deepcopy(a) for a in args])
        return kit(*args)

    assert exercises.verify(name, record).ok

    def recall(*args):
        if any(_same(list(args), s) for s in seen):
            return kit(*args)
        raise ValueError("an input the notebook never showed")
    return recall


@pytest.mark.parametrize("name", RANDOM_INPUTS)
def test_hidden_inputs_are_not_the_notebooks(name):
    fitted = _memorizer(name)
    assert exercises.verify(name, fitted, inputs=0).ok
    hidden = exercises.verify(name, fitted, inputs=1)
    assert not hidden.ok and "never showed" in hidden.message


@pytest.mark.parametrize("name", exercises.available())
def test_the_kits_function_passes_on_other_inputs(name):
    for inputs in (1, 7):
        v = exercises.verify(name, exercises.solution(name), inputs=inputs)
        assert v.ok, v.message


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(LabkitError, match="inputs=-1"):
        exercises.verify("pack_int4", exercises.solution("pack_int4"), inputs=-1)
    with pytest.raises(LabkitError, match="lesson='99'.*lessons with exercises: 00, 01"):
        otter.export(tmp_path, lesson="99")
    with pytest.raises(ValueError, match="seed=0"):
        otter.export(tmp_path, seed=0)
    with pytest.raises(ValueError, match="points=0"):
        otter.export(tmp_path, points=0)
    assert not (tmp_path / "tests").exists()
    assert main(["export-otter", str(tmp_path), "--seed", "-3"]) == 2


def test_judge_says_what_is_wrong():
    with pytest.raises(AssertionError, match="pack_int4 is not defined"):
        otter.judge("pack_int4", {})
    with pytest.raises(AssertionError, match="kit's own function"):
        otter.judge("pack_int4", {"pack_int4": exercises.solution("pack_int4")})
    with pytest.raises(AssertionError, match="is a int, not a function"):
        otter.judge("pack_int4", {"pack_int4": 3})
    with pytest.raises(AssertionError, match="not written yet"):
        otter.judge("pack_int4", {"pack_int4": lambda c: (_ for _ in ()).throw(NotImplementedError)})
    for wrapper in (lambda c: exercises.solution("pack_int4")(c), functools.partial(exercises.solution("pack_int4"))):
        with pytest.raises(AssertionError, match="kit's own function"):  # however it is wrapped
            otter.judge("pack_int4", {"pack_int4": wrapper}, inputs=3)

    def own_pack_int4(codes):  # the learner's own work passes, though the checker calls the kit's to compare
        c = codes.reshape(-1).to(torch.uint8)
        return (c[0::2] & 0xF) | ((c[1::2] & 0xF) << 4)

    otter.judge("pack_int4", {"pack_int4": own_pack_int4}, inputs=3)


def test_every_exercise_is_exported(tmp_path):
    files = otter.export(tmp_path, seed=5, points=2)
    assert [f.stem for f in files] == exercises.available()
    text = (tmp_path / "tests" / "pack_int4.py").read_text()
    assert "OK_FORMAT = False" in text and "points = 2" in text and "inputs=5" in text and "hidden=True" in text
    compile(text, "pack_int4.py", "exec")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_bind_each_exercise_to_its_name(path):
    """Otter's tests find the learner's function as the notebook's global of the exercise's name."""
    for cell in nbformat.read(path, as_version=4).cells:
        for bound, name, fn in re.findall(r"(\w+) = exercises\.check\(\"(\w+)\", (\w+)\)", cell.source):
            assert bound == name == fn, f"{path.name}: `{bound} = exercises.check({name!r}, {fn})`"


PACK = """def pack_int4(codes):
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return (c[0::2] | (c[1::2] << 4)).to(torch.uint8)"""
UNPACK_WRONG = """def unpack_int4(packed):
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)  # nibbles swapped"""


def _notebook(path, *bodies):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import torch\nfrom labkit import exercises")]
    for body in bodies:
        name = re.match(r"def (\w+)", body).group(1)
        nb.cells += [nbformat.v4.new_code_cell(body),
                     nbformat.v4.new_code_cell(f'{name} = exercises.check("{name}", {name})')]
    nbformat.write(nb, path)


def _otter(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "otter", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_otter_round_trip(tmp_path):
    pytest.importorskip("otter", reason="otter-grader is not installed (pip install 'labkit-inference[otter]')")
    assert main(["export-otter", str(tmp_path), "--lesson", "01b"]) == 0
    _otter("generate", "-t", "tests", "-o", "autograder.zip", "--no-requirements", "--no-environment",
           "--no-config", cwd=tmp_path)
    stub = "def pack_int4(codes):\n    raise NotImplementedError  # your code here"
    _notebook(tmp_path / "filled.ipynb", PACK, UNPACK_WRONG)
    _notebook(tmp_path / "empty.ipynb", stub)
    scores = {}
    for learner in ("filled", "empty"):
        (tmp_path / learner).mkdir()
        _otter("run", "-a", "autograder.zip", "-o", learner, "--no-logo", f"{learner}.ipynb", cwd=tmp_path)
        results = json.loads((tmp_path / learner / "results.json").read_text())
        scores[learner] = {t["name"]: (t["score"], t["output"]) for t in results["tests"] if "score" in t}
    filled, empty = scores["filled"], scores["empty"]
    assert set(filled) == set(exercises.available("01b"))
    assert filled["pack_int4"][0] == 1.0 and "All test cases passed" in filled["pack_int4"][1]
    assert filled["unpack_int4"][0] == 0 and "kit's own function" in filled["unpack_int4"][1]
    assert filled["double_quantize"][0] == 0 and "double_quantize is not defined" in filled["double_quantize"][1]
    assert all(score == 0 for score, _ in empty.values())
    assert "kit's own function" in empty["pack_int4"][1]
