"""labkit.baseline.dtype: the fp32-vs-bf16 comparison lesson 00 and the baseline record are made of."""

import torch
from torch import nn

from labkit import prepack
from labkit.baseline import dtype as dt


def test_cast_is_a_copy_and_the_fp32_model_stays():
    lin = nn.Linear(8, 4)
    low = dt.cast(lin, torch.bfloat16)
    assert low.weight.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32


def test_linear_speeds_time_every_variant_against_plain_fp32():
    rows = dt.linear_speeds(nn.Linear(64, 96), rows=(1, 8), repeats=1)
    layouts = {"plain", "prepacked"} if prepack.available() else {"plain"}
    assert {(r["rows"], r["dtype"], r["weights"]) for r in rows} == \
        {(n, d, w) for n in (1, 8) for d in ("float32", "bfloat16") for w in layouts}
    for r in rows:
        assert r["microseconds"] > 0
        if (r["dtype"], r["weights"]) == ("float32", "plain"):
            assert r["speedup_vs_fp32_plain"] == 1.0


def test_sentences_say_faster_or_slower_from_the_ratio():
    assert dt.pace(2.0) == "2.00x as fast" and dt.pace(0.5) == "2.00x slower"
    assert dt.speed_sentence({"dtype": "bfloat16", "decode_speedup_vs_fp32": 0.8}) == \
        "decode in bfloat16 ran 1.25x slower than fp32 here"
    assert dt.speed_sentence({"dtype": "bfloat16", "prefill_speedup_vs_fp32": 2.0}, "prefill") == \
        "prefill in bfloat16 ran 2.00x as fast as fp32 here"


def test_compare_encoder_reports_speed_and_cosine(minilm):
    from labkit import data, evaluate

    enc, tok = minilm
    row = dt.compare_encoder(enc, evaluate.encode_sentences(tok, data.sentences()[:4]), repeats=1)
    assert row["dtype"] == "bfloat16" and row["speedup_vs_fp32"] > 0 and row["cosine_to_fp32"] > 0.99
    assert abs(row["weight_bytes"] - 0.5 * (22_713_216 * 4)) < 0.01 * 22_713_216 * 4
    assert next(enc.parameters()).dtype == torch.float32
