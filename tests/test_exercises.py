"""Every exercise checker, three ways: the kit's own function passes, a plausible mistake fails with a useful
message, and an unwritten stub falls back to the kit's version."""

import statistics
import time

import pytest
import torch

from labkit import LabkitError, exercises
from labkit.quant import primitives as prim


def stub(*args, **kwargs):
    raise NotImplementedError


def time_mean_no_warmup(fn, warmup=2, repeats=5):
    times = []
    for _ in range(repeats + warmup):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def quantize_symmetric_by_mistake(x, bits):
    q, s = prim.quantize_symmetric(x, bits)
    return (q.int() + 2 ** (bits - 1)).clamp(0, 2**bits - 1).to(torch.uint8), s, torch.full_like(s, 2 ** (bits - 1))


WRONG = {  # a mistake a learner makes, and words the message must contain
    "time_fn": (time_mean_no_warmup, "cold start"),
    "quantize_asymmetric": (quantize_symmetric_by_mistake, "dequantized values"),
    "dequantize_asymmetric": (lambda q, s, z: q.float() * s, "(q - zero) * scale"),
    "pack_int4": (lambda c: ((c[0::2] << 4) | c[1::2]).to(torch.uint8), "nibbles are swapped"),
    "unpack_int4": (lambda p: torch.stack([p >> 4, p & 0xF], 1).reshape(-1), "unpacked codes"),
    "double_quantize": (lambda a, b=256: (a.to(torch.float16), torch.ones(1), torch.zeros(1)), "8 bits"),
    "slot": (lambda table, bs, t: table[t // bs] + t % bs, "block_size="),
    "paged_attention": (lambda q, k, v, table, bs, n: exercises.kit_paged_attention(q, k, v, table, bs, n) * 1.01,
                        "attention output"),
    "global_magnitude_masks": (lambda ws, s: [w.abs() >= w.abs().flatten().kthvalue(max(1, round(s * w.numel())))[0]
                                             if s else torch.ones_like(w, dtype=torch.bool) for w in ws],
                               "layer-wise"),
    "parity": (lambda r, o: {"max_abs_diff": float((torch.as_tensor(r) - torch.as_tensor(o)).abs().max()),
                             "cosine": float(torch.nn.functional.cosine_similarity(torch.as_tensor(r).flatten(),
                                                                                   torch.as_tensor(o).flatten(), dim=0))},
               "cosine per row"),
    "bias_gelu": (lambda x, b: torch.nn.functional.gelu(x + b, approximate="tanh"), "tanh approximation"),
    "hinton_loss": (lambda s, t, y, T, a: a * torch.nn.functional.kl_div(
        torch.log_softmax(s / T, -1), torch.log_softmax(t.detach() / T, -1), log_target=True, reduction="batchmean")
        + (1 - a) * torch.nn.functional.cross_entropy(s, y), "T² factor"),
}


def test_every_exercise_has_a_wrong_answer_under_test():
    assert set(WRONG) == set(exercises.available())
    assert exercises.available("06") == ["slot", "paged_attention"]


@pytest.mark.parametrize("name", exercises.available())
def test_the_kits_own_function_passes(name, capsys):
    fn = exercises.solution(name)
    assert exercises.check(name, fn) is fn
    assert capsys.readouterr().out.startswith(f"✓ {name}")


@pytest.mark.parametrize("name", exercises.available())
def test_a_wrong_function_fails_with_a_useful_message(name, capsys):
    wrong, words = WRONG[name]
    v = exercises.verify(name, wrong)
    assert not v.ok and v.fallback and words in v.message, v.message
    assert exercises.check(name, wrong) is exercises.solution(name)
    assert capsys.readouterr().out.startswith(f"✗ {name}")


@pytest.mark.parametrize("name", exercises.available())
def test_an_unwritten_stub_falls_back_to_the_kit(name, capsys):
    assert exercises.check(name, stub) is exercises.solution(name)
    out = capsys.readouterr().out
    assert "not written yet" in out and "goes on with the kit's version" in out


def test_a_crashing_function_is_reported_not_raised():
    v = exercises.verify("slot", lambda table, bs, t: table[999])
    assert not v.ok and "IndexError" in v.message


def test_unknown_exercise_is_a_clear_error():
    with pytest.raises(LabkitError, match="name='pack_int3'.*available: time_fn"):
        exercises.check("pack_int3", stub)
