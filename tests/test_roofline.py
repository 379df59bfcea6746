"""The measured ceilings: positive, in the units they claim, and the decode ceilings follow the arithmetic."""

import json

import pytest
import torch

from labkit import LabkitError, cli, roofline


def test_bandwidth_and_matmul_are_measured_in_plausible_units():
    bw = roofline.memory_bandwidth("cpu", mib=64, repeats=3)
    flops = roofline.matmul_flops("cpu", n=256, repeats=3)
    assert 1e8 < bw < 1e13  # 0.1 GB/s .. 10 TB/s
    assert 1e8 < flops < 1e16


def test_decode_ceilings_follow_the_roofline_arithmetic():
    c = roofline.Ceilings("cpu", bandwidth_bytes_per_s=10e9, matmul_flops_per_s=200e9, matmul_dtype="float32",
                          threads=2)
    one = c.decode_tokens_per_s(weight_bytes=500_000_000, params=125_000_000, batch=1)
    assert one["memory_bound_tok_s"] == pytest.approx(20.0) and one["compute_bound_tok_s"] == pytest.approx(800.0)
    assert one["ceiling_tok_s"] == pytest.approx(20.0)  # batch 1: memory-bound
    big = c.decode_tokens_per_s(weight_bytes=500_000_000, params=125_000_000, batch=64)
    assert big["ceiling_tok_s"] == pytest.approx(800.0)  # 64 x 20 = 1280 > 800: compute-bound
    with pytest.raises(LabkitError, match="batch=0"):
        c.decode_tokens_per_s(1, 1, batch=0)
    with pytest.raises(ValueError, match="mib=0"):
        roofline.memory_bandwidth(mib=0)


def test_doctor_measures_the_ceilings_on_request(capsys):
    assert cli.main(["doctor", "--json", "--ceilings", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ceilings"]["device"] == "cpu" and info["ceilings"]["bandwidth_gb_s"] > 0.1
    assert info["ceilings"]["threads"] == torch.get_num_threads()


def test_decode_bytes_per_token_reads_a_tied_head_but_not_an_untied_lookup():
    from labkit.measure import weight_bytes
    from tests.conftest import tiny_llama

    tied, untied = tiny_llama(), tiny_llama(tie_word_embeddings=False)
    table = 49152 * 64 * 4
    assert roofline.decode_bytes_per_token(tied) == weight_bytes(tied)  # lm_head reads the shared table in full
    assert roofline.decode_bytes_per_token(untied) == weight_bytes(untied) - table  # a lookup reads one row
