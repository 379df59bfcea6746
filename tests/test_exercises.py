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


def call_times(fn, n):
    """Seconds of each of ``n`` calls of ``fn``: the loop every learner's timing function is built on."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_mean_no_warmup(fn, warmup=2, repeats=5):
    return statistics.mean(call_times(fn, warmup + repeats))


def quantize_symmetric_by_mistake(x, bits):
    q, s = prim.quantize_symmetric(x, bits)
    return (q.int() + 2 ** (bits - 1)).clamp(0, 2**bits - 1).to(torch.uint8), s, torch.full_like(s, 2 ** (bits - 1))


def fuse_every_add_gelu(nodes, consts, outs, check_readers=True, check_tanh=True):
    """A BiasGelu pass with one of its legality checks left out."""
    prod = {n["output"]: n for n in nodes}
    reads = [i for n in nodes for i in n["inputs"]] + list(outs)
    out, drop = [], set()
    for n in nodes:
        a = prod.get(n["inputs"][0]) if n["op"] == "Gelu" else None
        legal = a is not None and a["op"] == "Add" and (not check_readers or reads.count(a["output"]) == 1) and (
            not check_tanh or n.get("attrs", {}).get("approximate", "none") == "none")
        bias = [i for i in (a or {}).get("inputs", []) if len(consts.get(i, ())) == 1]
        x = [i for i in (a or {}).get("inputs", []) if i not in consts]
        if legal and len(bias) == 1 and len(x) == 1:
            drop.add(a["output"])
            out.append({"op": "BiasGelu", "inputs": [x[0], bias[0]], "output": n["output"]})
        else:
            out.append(n)
    return [n for n in out if n["output"] not in drop]


def parity_but(r, o, m, cosine="row", use_mask=True, rtol=1e-3):
    """The parity check with one thing done differently: the cosine's rows, the mask, the tolerance."""
    a, b = torch.as_tensor(r).float(), torch.as_tensor(o).float()
    keep = (torch.as_tensor(m).bool() if use_mask else torch.ones(a.shape[:2], dtype=torch.bool))[..., None]
    a0, b0 = a * keep, b * keep
    diff = (a0 - b0).abs()
    cos = torch.nn.functional.cosine_similarity
    c = {"row": lambda: cos(a0.flatten(1), b0.flatten(1), dim=-1).mean(), "global": lambda: cos(a0.flatten(),
         b0.flatten(), dim=0), "token": lambda: cos(a0, b0, dim=-1).mean()}[cosine]()
    return {
        "max_abs_diff": float(diff.max()),
        "worst": list(torch.unravel_index(diff.argmax(), diff.shape)),
        "cosine": float(c),
        "within_tolerance": bool(((a - b).abs() <= 1e-4 + rtol * a.abs())[keep.expand_as(a)].all()),
    }


def ngram_earliest(context, k, n_max=4):
    """Prompt lookup that takes the *earliest* earlier occurrence of the suffix, not the latest."""
    for n in range(min(n_max, len(context) - 1), 0, -1):
        for start in range(0, len(context) - n):
            if context[start:start + n] == context[-n:]:
                return context[start + n:start + n + k]
    return []


WRONG = {  # a mistake a learner makes, and words the message must contain
    "smooth_scales": (lambda a, w, al=0.5: a.clamp(min=1e-5) ** al / w.abs().amax(0).clamp(min=1e-5), "the scales"),
    "linear_params": (lambda h, i, layers, heads, kv: layers * (4 * h * h + 3 * h * i), "k and v"),
    "ngram_propose": (ngram_earliest, "latest earlier occurrence"),
    "goodput": (lambda reqs, d, ttft=None, tpot=None: sum(1 for r in reqs if r["error"] is None) / d,  # no SLO
                "at or under each target"),
    "time_fn": (time_mean_no_warmup, "not the mean"),
    "quantize_asymmetric": (quantize_symmetric_by_mistake, "half a step"),
    "dequantize_asymmetric": (lambda q, s, z: q.float() * s, "(q - zero) * scale"),
    "pack_int4": (lambda c: ((c[0::2] << 4) | c[1::2]).to(torch.uint8), "nibbles are swapped"),
    "unpack_int4": (lambda p: torch.stack([p >> 4, p & 0xF], 1).reshape(-1), "unpacked codes"),
    "double_quantize": (lambda a, b=256: (a.to(torch.float16), torch.ones(1), torch.zeros(1)), "8 bits"),
    "append_slot": (
        lambda table, n, free, refs, bs: (table[n // bs] + n % bs, None) if table else (0, None),
        "block_size + t % block_size",
    ),
    "paged_attention": (
        lambda q, k, v, table, bs, n: exercises.solution("paged_attention")(q, k, v, table, bs, n) * 1.01,
        "attention output",
    ),
    "global_magnitude_masks": (
        lambda ws, s: [
            w.abs() >= w.abs().flatten().kthvalue(max(1, round(s * w.numel())))[0]
            if s
            else torch.ones_like(w, dtype=torch.bool)
            for w in ws
        ],
        "layer-wise",
    ),
    "parity": (lambda r, o, m: parity_but(r, o, m, cosine="global"), "cosine per row"),
    "fuse_bias_gelu": (
        lambda nodes, consts, outs: fuse_every_add_gelu(nodes, consts, outs, check_readers=False),
        "the sum is read by another node too",
    ),
    "choose": (lambda rows, within, base: min(rows, key=lambda r: r["weight_bytes"])["name"], "loses too much"),
    "hinton_loss": (
        lambda s, t, y, T, a: (
            a
            * torch.nn.functional.kl_div(
                torch.log_softmax(s / T, -1),
                torch.log_softmax(t.detach() / T, -1),
                log_target=True,
                reduction="batchmean",
            )
            + (1 - a) * torch.nn.functional.cross_entropy(s, y)
        ),
        "T² factor",
    ),
}


def test_every_exercise_has_a_wrong_answer_under_test():
    assert set(WRONG) == set(exercises.available())
    assert exercises.available("06a") == ["append_slot", "paged_attention"]


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
    v = exercises.verify("append_slot", lambda table, n, free, refs, bs: table[999])
    assert not v.ok and "IndexError" in v.message


def test_unknown_exercise_is_a_clear_error():
    with pytest.raises(LabkitError, match="name='pack_int3'.*available: time_fn"):
        exercises.check("pack_int3", stub)


# ------------------------------------------------------------------ checkers that judge fairly (issue 17, §4)

def time_mean_after_warmup(fn, warmup=2, repeats=5):
    call_times(fn, warmup)
    return statistics.mean(call_times(fn, repeats))


def time_median_of_every_call(fn, warmup=2, repeats=5):
    return statistics.median(call_times(fn, warmup + repeats))


def parity_per_token(r, o, m):
    return parity_but(r, o, m, cosine="token")


def quantize_with_codes_as(dtype):
    def fn(x, bits):
        q, s, z = prim.quantize_asymmetric(x, bits)
        return q.to(dtype), s, z
    return fn


def global_masks_with_int(ws, s):
    flat = torch.cat([w.abs().flatten() for w in ws])
    k = int(s * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = False
    return [m.view_as(w) for m, w in zip(keep.split([w.numel() for w in ws]), ws)]


def attention_over_pages(q, k_cache, v_cache, table, bs, n, kv_of):
    slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(n)])
    k, v = (
        k_cache[slots][:, kv_of(q.shape[0], k_cache.shape[1])],
        v_cache[slots][:, kv_of(q.shape[0], k_cache.shape[1])],
    )
    w = torch.softmax((q[:, None] * k.transpose(0, 1)).sum(-1) / q.shape[1] ** 0.5, -1)
    return (w[..., None] * v.transpose(0, 1)).sum(1)


def paged_attention_without_gqa(q, k, v, table, bs, n):  # assumes one KV head per query head
    return attention_over_pages(q, k, v, table, bs, n, lambda h, kvh: torch.arange(h))


def paged_attention_heads_interleaved(q, k, v, table, bs, n):  # repeat, not repeat_interleave
    return attention_over_pages(q, k, v, table, bs, n, lambda h, kvh: torch.arange(h) % kvh)


def append_without_copy_on_write(table, n, free, refs, bs):
    if n >= len(table) * bs:
        table.append(free.pop(0))
        refs[table[-1]] = 1
    return table[n // bs] * bs + n % bs, None


def append_one_token_late(table, n, free, refs, bs):  # allocates only once the token is past the end
    if n > len(table) * bs:
        table.append(free.pop(0))
        refs[table[-1]] = 1
    return table[min(n // bs, len(table) - 1)] * bs + n % bs, None


def _base(rows, name):
    return next(r for r in rows if r["name"] == name)["accuracy"]


def choose_strictly_within(rows, within, base):
    return min((r for r in rows if r["accuracy"] > _base(rows, base) - within), key=lambda r: r["weight_bytes"])["name"]


def choose_ignoring_ties(rows, within, base):
    return min((r for r in rows if r["accuracy"] >= _base(rows, base) - within),
               key=lambda r: r["weight_bytes"])["name"]


def choose_always_dense(rows, within, base):
    d = _base(rows, "dense")
    return min((r for r in rows if r["accuracy"] >= d - within), key=lambda r: (r["weight_bytes"], -r["accuracy"]))[
        "name"
    ]


@pytest.mark.parametrize("name, wrong, words", [
    ("time_fn", time_mean_after_warmup, "not the mean"),
    ("time_fn", time_median_of_every_call, "cold-start calls got in"),
    ("parity", parity_per_token, "tokens scaled unevenly: your cosine"),
    ("parity", lambda r, o, m: parity_but(r, o, m, use_mask=False), "garbage at padded positions only"),
    ("parity", lambda r, o, m: parity_but(r, o, m, rtol=1e-2), "just outside tolerance: your within_tolerance"),
    ("quantize_asymmetric", quantize_with_codes_as(torch.float32), "torch.uint8, not torch.float32"),
    ("quantize_asymmetric", quantize_with_codes_as(torch.int64), "torch.uint8, not torch.int64"),
    ("global_magnitude_masks", global_masks_with_int, "int() truncates"),
    ("paged_attention", paged_attention_without_gqa, "query head h reads KV head h // 3"),
    ("paged_attention", paged_attention_heads_interleaved, "not h % 3"),
    ("append_slot", append_without_copy_on_write, "copied to a fresh block before the write"),
    ("append_slot", append_one_token_late, "at a block boundary: take the first free block"),
    ("fuse_bias_gelu", lambda n, c, o: fuse_every_add_gelu(n, c, o, check_tanh=False), "tanh Gelu is FastGelu"),
    ("choose", choose_strictly_within, ">=, not >"),
    ("choose", choose_ignoring_ties, "on a tie in bytes, the more accurate"),
    ("choose", choose_always_dense, "baseline='teacher'"),
])
def test_wrong_solutions_that_used_to_pass_now_fail(name, wrong, words):
    v = exercises.verify(name, wrong)
    assert not v.ok and words in v.message, v.message


def quantize_textbook_minmax(x, bits):
    """The textbook zero point over the row's own [min, max] (0 need not be on the grid)."""
    qmax = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


def quantize_with_flat_scales(x, bits):
    q, s, z = prim.quantize_asymmetric(x, bits)
    return q, s.reshape(-1), z.reshape(-1)


def double_quantize_python_mean(a, blocksize=256):
    q, s, o = prim.double_quantize(a, blocksize)
    return q, s, float(o)


def double_quantize_padded(a, blocksize=256):
    import math

    q, s, o = prim.double_quantize(a, blocksize)
    return torch.nn.functional.pad(q, (0, math.ceil(a.numel() / blocksize) * blocksize - q.numel())), s, o


def hinton_soft_cross_entropy(s, t, y, T, a):
    soft = -(torch.softmax(t.detach() / T, -1) * torch.log_softmax(s / T, -1)).sum(-1).mean() * T**2
    return a * soft + (1 - a) * torch.nn.functional.cross_entropy(s, y)


@pytest.mark.parametrize("name, right", [
    ("quantize_asymmetric", quantize_textbook_minmax),
    ("quantize_asymmetric", quantize_with_flat_scales),
    ("double_quantize", double_quantize_python_mean),
    ("double_quantize", double_quantize_padded),
    ("hinton_loss", hinton_soft_cross_entropy),
])
def test_right_solutions_that_used_to_fail_now_pass(name, right):
    v = exercises.verify(name, right)
    assert v.ok, v.message
    if name == "hinton_loss":
        assert "same gradients" in v.message
