import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from labkit import LabkitError, data


def test_splits_are_disjoint_and_stable():
    ev, cal = data.text("evaluation"), data.text("calibration")
    assert len(ev) > 50_000 and len(cal) > 200_000
    assert ev[:2000] not in cal
    assert data.text("evaluation") is ev  # cached, identical


def test_unknown_split_lists_allowed():
    with pytest.raises(LabkitError, match="split='train'.*calibration"):
        data.text("train")


@given(n=st.integers(2, 400), window=st.integers(2, 64), frac=st.floats(0.1, 1.0))
def test_windows_score_every_token_exactly_once(n, window, frac):
    stride = max(1, int(window * frac))
    ids = torch.arange(n)
    wins = data.windows(ids, window=window, stride=stride)
    scored = []
    for w, k in wins:
        assert 1 <= k <= w.shape[1] - 1 and w.shape[1] <= window
        scored.extend(w[0, -k:].tolist())
    assert scored == list(range(1, n))


def test_window_errors_name_the_parameter():
    with pytest.raises(LabkitError, match="stride=9"):
        data.windows(torch.arange(10), window=8, stride=9)
    with pytest.raises(LabkitError, match="window=1"):
        data.windows(torch.arange(10), window=1)


def test_digits_splits_fixed_and_disjoint():
    s = data.digits_splits()
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [1078, 359, 360]
    assert s["train"][0].shape[1:] == (1, 8, 8) and float(s["train"][0].max()) <= 1.0
    again = data._digits_splits.__wrapped__(0)  # uncached: the split is rebuilt from the seed
    assert torch.equal(again["test"][1], s["test"][1])


def test_sentences_ship_with_the_kit():
    sents = data.sentences()
    assert len(sents) >= 30 and all(s.endswith(".") for s in sents)


def test_calibration_batches_shape(tokenizer):
    b = data.calibration_batches(tokenizer, n=4, seq_len=64)
    assert b.shape == (4, 64)
    with pytest.raises(LabkitError, match="calibration tokens"):
        data.calibration_batches(tokenizer, n=10_000, seq_len=1024)
