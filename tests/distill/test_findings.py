"""The distillation lesson's sentences are computed: a record with the opposite outcome says the opposite."""

import copy
import json

import pytest

from labkit.distill import experiment as distillation
from labkit.results import Record, load_reference


@pytest.fixture(scope="module")
def rec() -> Record:
    ref = load_reference("distillation")
    assert ref is not None, "the reference distillation record ships with the package"
    return ref[0]


def _set(rec: Record, name: str, **fields) -> Record:
    out = copy.deepcopy(rec)
    next(v for v in out.variants if v["name"] == name).update(fields)
    return out


def test_soft_versus_hard_labels_follows_the_numbers(rec):
    below = distillation.cnn_findings(_set(rec, "student-kd-transfer", accuracy=0.90, accuracy_std=0.005))[-1]
    above = distillation.cnn_findings(_set(rec, "student-kd-transfer", accuracy=0.995, accuracy_std=0.005))[-1]
    tie = distillation.cnn_findings(_set(rec, "student-kd-transfer", accuracy=0.9745, accuracy_std=0.01))[-1]
    assert "*below* hard labels" in below and "add" not in below.split("—")[1]
    assert "soft targets add" in above
    assert "no measurable difference" in tie


def test_kd_gain_over_scratch_follows_the_numbers(rec):
    lost = distillation.cnn_findings(_set(rec, "student-kd", accuracy=0.70))[0]
    assert "cost 14.1 points" in lost and "add" not in lost
    assert "add 9.1 points" in distillation.cnn_findings(rec)[0]


def test_lm_sentences_follow_the_numbers(rec):
    said = " ".join(distillation.lm_findings(rec))
    assert "KD is ahead" in said and "improved held-out perplexity from 421 to 217" in said
    flipped = _set(_set(rec, "lm-student-lmloss", perplexity=500.0, train_loss=[6.5, 6.3, 6.2, 6.2]),
                   "lm-student-kd", perplexity=600.0)
    said = " ".join(distillation.lm_findings(flipped))
    assert "Next-token loss is ahead" in said and "worsened held-out perplexity from 421 to 500" in said
    assert "not memorising" in said and "far below" not in said


def test_the_notebook_prints_the_computed_sentences():
    cells = ["".join(c["source"]) for c in json.load(open("notebooks/03_distillation.ipynb"))["cells"]]
    assert any("distillation.cnn_findings(rec)" in c for c in cells)
    assert any("distillation.lm_findings(lm_rec)" in c for c in cells)
    assert not any("add little or nothing" in c or "got worse on held-out" in c for c in cells)


def test_the_learners_loss_really_trains_the_kd_students():
    """The notebook passes the learner's hinton_loss: a 'KD' loss that ignores the teacher must give exactly the
    scratch student, so a wrong answer visibly changes the table that follows."""
    import torch.nn.functional as F

    cfg = distillation.Config.smallest()
    cfg.run_lm = False
    no_teacher = distillation.run(cfg, progress=False, kd_loss=lambda s, t, y, T, a: F.cross_entropy(s, y))
    v = {x["name"]: x for x in no_teacher.variants}
    assert v["student-kd"]["accuracy_per_seed"] == v["student-scratch"]["accuracy_per_seed"]
    assert no_teacher.config["kd_loss"].endswith("<lambda>")  # the record names the loss that trained it
