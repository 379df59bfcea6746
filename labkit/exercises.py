"""The learner's turn: write the core function, and a check answers at once.

``check(name, fn)`` runs ``fn`` against the kit's own implementation on seeded random inputs (the shapes and
dtypes that matter, and edge cases: a constant row, a partial last block, a single row), prints ✓ or the
first difference in words, and returns the function the notebook should go on with: the learner's when it
passes, else the kit's (so a workshop never blocks on an empty or wrong exercise). A stub that still raises
``NotImplementedError`` is reported as such. ``available()`` lists the exercises; solutions live in the kit.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit import LabkitError
from labkit.quant import primitives as prim


class Mismatch(Exception):
    """The learner's function disagrees with the kit's; the message says where and how."""


@dataclass
class Verdict:
    name: str
    ok: bool
    message: str
    fallback: bool  # True when the notebook goes on with the kit's version


# ------------------------------------------------------------------------------------------ helpers

def _close(name: str, got: Any, want: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs()
    bad = diff > atol + rtol * want.float().abs()
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise Mismatch(f"{what}: at index {i} you give {got[i].item():.6g}, the kit gives {want[i].item():.6g} "
                       f"({int(bad.sum())} of {bad.numel()} values differ)")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ 00: timing

def kit_time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed calls, synchronising CUDA around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _timed_workload(cold_calls: int, cold_s: float, hiccup_call: int | None) -> tuple[Callable[[], None], dict]:
    """A call that sleeps ``cold_s`` for its first ``cold_calls`` calls, 60 ms on call ``hiccup_call``, else 4 ms."""
    calls = {"n": 0}

    def workload() -> None:
        calls["n"] += 1
        n = calls["n"]
        time.sleep(cold_s if n <= cold_calls else 0.06 if n == hiccup_call else 0.004)

    return workload, calls


def _check_timing(fn: Callable) -> str:
    # Two rounds, each catching what the other cannot: one slow repeat among the timed calls (the mean moves, the
    # median does not), then more cold calls than timed ones (a median over *all* calls lands on a cold one).
    rounds = [(2, 5, 0.08, 5, "one timed call took 60 ms: take the median of the repeats, not the mean"),
              (4, 3, 0.05, None, "the 4 cold-start calls got in: time only after the warm-up calls")]
    got = 0.0
    for warmup, repeats, cold_s, hiccup, hint in rounds:
        workload, calls = _timed_workload(warmup, cold_s, hiccup)
        got = fn(workload, warmup=warmup, repeats=repeats)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Mismatch(f"return the time in seconds as a float, not {type(got).__name__}")
        if calls["n"] != warmup + repeats:
            raise Mismatch(f"with warmup={warmup} and repeats={repeats} the workload should run {warmup + repeats} "
                           f"times; yours ran it {calls['n']} times")
        if got > 0.009:
            raise Mismatch(f"warmup={warmup}, repeats={repeats}: you measured {got * 1e3:.1f} ms for a ~4 ms call "
                           f"— {hint}")
        if got < 0.003:
            raise Mismatch(f"you measured {got * 1e3:.2f} ms for a call that sleeps 4 ms: is the clock read around "
                           "fn()?")
    return f"median {got * 1e3:.1f} ms for a 4 ms call, cold start and outlier ignored"


# ------------------------------------------------------------------------------------------ 01: quantization

def _quant_inputs() -> list[tuple[str, torch.Tensor, int]]:
    g = _gen(0)
    skewed = torch.rand(4, 64, generator=g) * 3 + 0.5  # all positive: half of a symmetric grid would be wasted
    return [("random rows, 4 bits", torch.randn(8, 64, generator=g), 4),
            ("random rows, 8 bits", torch.randn(8, 128, generator=g), 8),
            ("all-positive rows, 4 bits", skewed, 4),
            ("a constant row", torch.full((1, 32), 0.7), 4),
            ("a single value per row", torch.randn(5, 1, generator=g), 2)]


def _per_row(t: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    """A scale or zero point as a ``[rows, 1]`` column: ``[rows]`` and Python numbers are fine too."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.numel() == x.shape[0] and t.dim() <= 2:
        return t.reshape(-1, 1)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(x.shape[0], 1)
    raise Mismatch(f"one {what} per row: {x.shape[0]} expected, yours has shape {tuple(t.shape)}")


def _check_quantize_asymmetric(fn: Callable) -> str:
    # Judged by what quantization must do, not by the kit's exact choices: uint8 codes in range, and every value
    # rebuilt within half a step of the kit's grid. A tighter grid (the textbook min/max range, which need not
    # include 0) passes; a coarser one or a symmetric grid on all-positive rows does not.
    for label, x, bits in _quant_inputs():
        out = fn(x, bits)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise Mismatch("return three things: (codes, scale, zero)")
        q, scale, zero = out
        if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
            kind = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
            raise Mismatch(f"{label}: store the codes as torch.uint8, not {kind} — a float32 code takes 4 bytes and "
                           "an int64 code 8, so the memory quantization was meant to save is gone")
        if tuple(q.shape) != tuple(x.shape):
            raise Mismatch(f"{label}: one code per value: shape {tuple(x.shape)} expected, yours {tuple(q.shape)}")
        if int(q.max()) > 2**bits - 1:
            raise Mismatch(f"{label}: {bits}-bit codes lie in 0..{2**bits - 1}; yours reach {int(q.max())}")
        scale, zero = _per_row(scale, x, "scale"), _per_row(zero, x, "zero point")
        _, ks, _ = prim.quantize_asymmetric(x, bits)
        back = prim.dequantize_asymmetric(q, scale, zero)
        err = (back - x).abs()
        allowed = 0.5 * ks * (1 + 1e-4) + 1e-6
        bad = ~(err <= allowed)  # NaN counts as bad
        if bad.any():
            r, c = (int(v) for v in bad.nonzero()[0])
            raise Mismatch(f"{label}: value {x[r, c].item():.5g} comes back as {back[r, c].item():.5g}, "
                           f"{err[r, c].item():.3g} away; a {bits}-bit grid from the row's min to its max keeps "

                           f"every value within {allowed[r].item():.3g} (half a step) — check the scale "
                           "(max − min) / (2^bits − 1) and the zero point round(−min / scale)")
    return "uint8 codes that rebuild every value within half a step (constant and all-positive rows included)"


def _check_dequantize_asymmetric(fn: Callable) -> str:
    for label, x, bits in _quant_inputs():
        q, s, z = prim.quantize_asymmetric(x, bits)
        _close("", fn(q, s, z), prim.dequantize_asymmetric(q, s, z), f"{label}: x̂ = (q - zero) * scale")
    return "x̂ = (q − zero) · scale on every row"


def _check_pack_int4(fn: Callable) -> str:
    g = _gen(1)
    cases = [("random codes", torch.randint(0, 16, (64,), generator=g, dtype=torch.uint8)),
             ("all 15s", torch.full((10,), 15, dtype=torch.uint8)), ("two codes", torch.tensor([3, 12], dtype=torch.uint8))]
    for label, codes in cases:
        got = fn(codes)
        want = prim.pack_int4(codes)
        if isinstance(got, torch.Tensor) and got.dtype != torch.uint8:
            raise Mismatch(f"{label}: pack into uint8 bytes, not {got.dtype}")
        if isinstance(got, torch.Tensor) and got.numel() == want.numel() and not torch.equal(got.reshape(-1), want):
            swapped = (want & 0xF) << 4 | (want >> 4)
            if torch.equal(got.reshape(-1), swapped):
                raise Mismatch(f"{label}: the nibbles are swapped — the kit puts the first code in the low 4 bits")
        _close("", got.reshape(-1) if isinstance(got, torch.Tensor) else got, want, f"{label}: packed bytes", atol=0)
    return "two codes per byte, first code in the low nibble: half the bytes of uint8 codes"


def _check_unpack_int4(fn: Callable) -> str:
    g = _gen(2)
    for label, codes in [("random codes", torch.randint(0, 16, (64,), generator=g, dtype=torch.uint8)),
                         ("all 15s", torch.full((8,), 15, dtype=torch.uint8))]:
        got = fn(prim.pack_int4(codes))
        _close("", got.reshape(-1) if isinstance(got, torch.Tensor) else got, codes, f"{label}: unpacked codes", atol=0)
    return "unpack(pack(codes)) == codes"


def _check_double_quantize(fn: Callable) -> str:
    g = _gen(3)
    cases = [("4096 block constants", torch.rand(4096, generator=g) * 0.2 + 0.05),
             ("a partial last block (1000 constants)", torch.rand(1000, generator=g) * 0.3 + 0.01),
             ("identical constants", torch.full((300,), 0.125))]
    for label, absmax in cases:
        out = fn(absmax, 256)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise Mismatch("return three things: (int8 codes, per-block scales, the subtracted mean)")
        q, scale, offset = out
        scale, offset = torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(offset, dtype=torch.float32)
        if not isinstance(q, torch.Tensor) or q.dtype not in (torch.int8, torch.uint8):
            kind = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
            raise Mismatch(f"{label}: the codes must be stored in 8 bits, yours are {kind}")
        padded = math.ceil(absmax.numel() / 256) * 256
        if q.numel() == padded:  # codes of the zero padding of the last block: stored, but not constants
            q = q.reshape(-1)[: absmax.numel()]
        if q.numel() != absmax.numel():
            raise Mismatch(f"{label}: one code per constant: {absmax.numel()} expected (or {padded} with the last "
                           f"block's padding), {q.numel()} given")
        if scale.numel() != padded // 256:
            raise Mismatch(f"{label}: one scale per block of 256 constants: {padded // 256} expected, "
                           f"{scale.numel()} given")
        offset = offset.reshape(-1)[:1]
        kq, ks, ko = prim.double_quantize(absmax, 256)
        _close("", prim.double_dequantize(q, scale, offset, 256), prim.double_dequantize(kq, ks, ko, 256),
               f"{label}: the reconstructed constants", atol=1e-6)
    bits = 4 + (8 * q.element_size() * q.numel() + 8 * scale.element_size() * scale.numel()
                + 8 * offset.element_size() * offset.numel()) / (64 * absmax.numel())
    if bits > 4.2:
        raise Mismatch(f"NF4 blocks of 64 with your constants cost {bits:.3f} bits/weight; double quantization "
                       "should bring them to about 4.13")
    return f"constants rebuilt as the kit's; NF4 g64 with them costs {bits:.3f} bits/weight (4.5 without)"


# ------------------------------------------------------------------------------------------ 06: paging

def _slot(block_table: list[int], block_size: int, t: int) -> int:
    """Flat KV-cache slot of token ``t``: its physical block times the block size, plus its offset in the block."""
    return block_table[t // block_size] * block_size + t % block_size


def kit_append_slot(block_table: list[int], num_tokens: int, free_blocks: list[int], ref_counts: dict[int, int],
                    block_size: int) -> tuple[int, tuple[int, int] | None]:
    """Make room for a sequence's token number ``num_tokens`` (0-based) and return ``(slot, copy)``: the flat
    KV slot it is written to, and ``(src, dst)`` when its last block was shared and had to be copied first
    (copy-on-write), else None. New blocks come from the front of ``free_blocks``; ``block_table``,
    ``free_blocks`` and ``ref_counts`` (block id → sequences holding it) are updated in place.

    This is the engine's own code: :meth:`BlockManager.append_slot`, then :meth:`BlockManager.slot`."""
    from labkit.serve.block_manager import BlockManager
    from labkit.serve.sequence import Sequence

    bm = BlockManager(max([*block_table, *free_blocks, *ref_counts], default=0) + 1, block_size)
    bm.free_ids = deque(free_blocks)
    for b in bm.blocks:
        b.ref_count = ref_counts.get(b.block_id, 0)
    seq = Sequence([0] * (num_tokens + 1), block_size, block_table=list(block_table))
    copy = bm.append_slot(seq)
    block_table[:], free_blocks[:] = seq.block_table, list(bm.free_ids)
    ref_counts.clear()
    ref_counts.update({b.block_id: b.ref_count for b in bm.blocks if b.ref_count})
    return bm.slot(seq, num_tokens), copy


def kit_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[int],
                        block_size: int, context_len: int) -> torch.Tensor:
    """One decode query ``q [heads, d]`` attending over the first ``context_len`` tokens of a sequence whose
    K/V live in ``k_cache``/``v_cache`` ``[num_slots, kv_heads, d]`` at the slots its block table names.
    ``kv_heads`` may divide ``heads`` (grouped-query attention: query head h reads KV head h // (heads //
    kv_heads)). This is the engine's own code path: :meth:`KVCache.gather` of whole blocks, then
    ``serve.model._attend`` with the slots past the context masked out."""
    from labkit.serve.kv_cache import KVCache
    from labkit.serve.model import _attend

    heads, d = q.shape
    groups = heads // k_cache.shape[1]
    blocks = torch.tensor(block_table[:math.ceil(context_len / block_size)], device=q.device)
    ck, cv = KVCache.of_tensors(k_cache, v_cache, block_size).gather(0, blocks[None])  # [1, nb * B, kv_heads, d]
    mask = (torch.arange(ck.shape[1], device=q.device) < context_len)[None, None]  # [1, 1, L]
    out = _attend(q[None, :, None], ck, cv, mask, groups, 1 / math.sqrt(d))  # [1, 1, heads * d]
    return out.view(heads, d)


def _append_cases() -> list[tuple[str, dict]]:
    g = _gen(4)
    cases = [
        ("inside the last block: no new block", dict(block_table=[7], num_tokens=2, free_blocks=[3, 5],
                                                     ref_counts={7: 1}, block_size=4)),
        ("at a block boundary: take the first free block", dict(block_table=[7], num_tokens=4, free_blocks=[3, 5],
                                                                ref_counts={7: 1}, block_size=4)),
        ("the first token of an empty table", dict(block_table=[], num_tokens=0, free_blocks=[9, 2],
                                                   ref_counts={}, block_size=16)),
        ("block_size 1: every token a block", dict(block_table=[4, 1], num_tokens=2, free_blocks=[0],
                                                   ref_counts={4: 1, 1: 1}, block_size=1)),
        ("the last block is shared: copy it on write", dict(block_table=[2, 6], num_tokens=6, free_blocks=[8, 9],
                                                            ref_counts={2: 2, 6: 2}, block_size=4)),
        ("shared blocks, but the last is full: a fresh block, no copy",
         dict(block_table=[2, 6], num_tokens=8, free_blocks=[8], ref_counts={2: 2, 6: 2}, block_size=4)),
    ]
    free = torch.randperm(12, generator=g).tolist()
    table: list[int] = []
    refs: dict[int, int] = {}
    for t in range(10):  # a sequence growing token by token from nothing, block size 3
        cases.append((f"a sequence growing to {t + 1} tokens", dict(block_table=list(table), num_tokens=t,
                                                                    free_blocks=list(free), ref_counts=dict(refs),
                                                                    block_size=3)))
        kit_append_slot(table, t, free, refs, 3)
    return cases


def _check_append_slot(fn: Callable) -> str:
    for what, case in _append_cases():
        mine, kit = copy.deepcopy(case), copy.deepcopy(case)
        args = ("block_table", "num_tokens", "free_blocks", "ref_counts", "block_size")
        got, want = fn(*(mine[a] for a in args)), kit_append_slot(**kit)
        state = ", ".join(f"{k}={v}" for k, v in case.items())
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Mismatch(f"{what}: return (slot, copy) — copy is (src, dst) or None; you returned {got!r}")
        for label, a, b in (("copy", got[1], want[1]),
                            ("block_table afterwards", mine["block_table"], kit["block_table"]),
                            ("slot", got[0], want[0]),
                            ("free_blocks afterwards", mine["free_blocks"], kit["free_blocks"]),
                            ("ref_counts afterwards", {k: v for k, v in mine["ref_counts"].items() if v},
                             kit["ref_counts"])):
            if a != b:
                hint = {"slot": " (block_table[t // block_size] · block_size + t % block_size, after any new "
                                "block)",
                        "copy": " (a shared last block — ref count > 1 — is copied to a fresh block before the "
                                "write; a full last block needs a new block instead, no copy)"}.get(label, "")
                raise Mismatch(f"{what} ({state}): your {label} is {a!r}, the kit's {b!r}{hint}")
    return ("a new block exactly at block boundaries, copy-on-write for a shared last block, and the slot "
            "the token's K/V go to — what BlockManager.append_slot does every decode step")


def _check_paged_attention(fn: Callable) -> str:
    g = _gen(5)
    d = 8
    # (heads, kv_heads, block_size, context_len): SmolLM2, the served model, has 9 query heads and 3 KV heads
    for heads, kv_heads, block_size, context_len in ((4, 4, 4, 11), (4, 4, 16, 16), (4, 4, 1, 5), (4, 4, 8, 1),
                                                     (9, 3, 4, 10), (6, 2, 16, 20)):
        n_blocks = math.ceil(context_len / block_size)
        table = torch.randperm(12, generator=g)[:n_blocks].tolist()
        k_cache = torch.randn(12 * block_size, kv_heads, d, generator=g)
        v_cache = torch.randn(12 * block_size, kv_heads, d, generator=g)
        q = torch.randn(heads, d, generator=g)
        # The same K/V laid out contiguously, one copy per query head: what paging must reproduce.
        kv_of = torch.arange(heads) // (heads // kv_heads)
        k = torch.stack([k_cache[_slot(table, block_size, t)] for t in range(context_len)])[:, kv_of]
        v = torch.stack([v_cache[_slot(table, block_size, t)] for t in range(context_len)])[:, kv_of]
        want = torch.softmax((q.unsqueeze(1) * k.transpose(0, 1)).sum(-1) / math.sqrt(d), -1)
        want = (want.unsqueeze(-1) * v.transpose(0, 1)).sum(1)
        where = f"heads={heads}, kv_heads={kv_heads}, block_size={block_size}, context_len={context_len}"
        try:
            got = fn(q, k_cache, v_cache, table, block_size, context_len)
        except (RuntimeError, IndexError) as exc:  # shapes that only fit one KV head per query head
            if kv_heads == heads:
                raise
            raise Mismatch(f"{where}: your function raised {exc} — grouped-query attention: {heads} query heads "
                           f"share {kv_heads} KV heads, query head h reads KV head h // {heads // kv_heads}") from None
        hint = (f" (grouped-query attention: query head h reads KV head h // {heads // kv_heads}, not h % "
                f"{kv_heads})" if kv_heads < heads else "")
        _close("", got, want, f"{where}: the attention output{hint}", atol=1e-4)
    return ("attention over the gathered pages equals attention over contiguous K/V (partial last block and "
            "grouped-query heads included), as the engine computes it")


# ------------------------------------------------------------------------------------------ 03: distillation

def _kit_hinton(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.9):
    from labkit.distill.losses import hinton_loss

    return hinton_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)


def _check_hinton(fn: Callable) -> str:
    g = _gen(6)
    offset_seen = False
    for temperature, alpha in ((1.0, 0.5), (4.0, 0.9), (8.0, 1.0), (2.0, 0.0)):
        s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
        y = torch.randint(0, 10, (16,), generator=g)
        got, want = fn(s, t, y, temperature, alpha), _kit_hinton(s, t, y, temperature, alpha)
        if not isinstance(got, torch.Tensor) or got.numel() != 1:
            raise Mismatch("return the loss as a single-number tensor (average over the batch)")
        if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5) and _same_student_gradients(
                fn, s, t, y, temperature, alpha):
            offset_seen = True  # Hinton's own soft cross-entropy: KL plus the teacher's entropy, same gradients
            continue
        if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
            soft_only = _kit_hinton(s, t, y, temperature, 1.0)
            if temperature != 1 and alpha > 0 and torch.allclose(
                    got.float(), want - alpha * soft_only * (1 - 1 / temperature**2), rtol=1e-4, atol=1e-5):
                raise Mismatch(f"T={temperature:g}: the soft term is missing its T² factor (softening shrinks its "
                               "gradients by 1/T²; multiply the KL by T² to keep them comparable)")
            raise Mismatch(f"T={temperature:g}, alpha={alpha:g}: your loss is {float(got):.5f}, the kit's "
                           f"{float(want):.5f} — check the KL direction KL(teacher ‖ student), the T² factor and the "
                           "alpha mix")
    s = torch.randn(4, 10, generator=g, requires_grad=True)
    t = torch.randn(4, 10, generator=g, requires_grad=True)
    fn(s, t, torch.zeros(4, dtype=torch.long), 4.0, 0.9).backward()
    if t.grad is not None and t.grad.abs().sum() > 0:
        raise Mismatch("gradient reached the teacher's logits: detach them — only the student learns")
    if offset_seen:
        return ("your soft term is Hinton's cross-entropy with the teacher's soft targets: it differs from the "
                "kit's KL by the teacher's entropy, a constant, so the student gets the same gradients; no gradient "
                "into the teacher")
    return "T² · KL(teacher_T ‖ student_T) mixed with cross-entropy by alpha; no gradient into the teacher"


def _same_student_gradients(fn: Callable, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float,
                            alpha: float) -> bool:
    """Whether ``fn`` and the kit's loss give the student's logits the same gradient (a loss that differs only by a
    constant, such as cross-entropy instead of KL against the soft targets, trains identically)."""
    grads = []
    for loss in (fn, _kit_hinton):
        leaf = s.detach().clone().requires_grad_(True)
        out = loss(leaf, t, y, temperature, alpha)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return False
        out.backward()
        grads.append(leaf.grad)
    return grads[0] is not None and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ 02: pruning

def _kit_global_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    from labkit.prune.unstructured import global_magnitude_masks

    return global_magnitude_masks(weights, sparsity)


def _check_global_masks(fn: Callable) -> str:
    g = _gen(7)
    # layers of very different scales: a global threshold prunes the small-scale layer much harder
    weights = [torch.randn(16, 8, generator=g) * 0.1, torch.randn(32, 16, generator=g), torch.randn(10, 32, generator=g) * 3]
    total = sum(w.numel() for w in weights)
    for sparsity in (0.0, 0.33, 0.5, 0.9):  # 0.33 of 960 is 316.8: round() gives 317, int() 316
        got = fn(weights, sparsity)
        want = _kit_global_masks(weights, sparsity)
        if not isinstance(got, (list, tuple)) or len(got) != len(weights):
            raise Mismatch(f"return one mask per weight tensor ({len(weights)}), got {type(got).__name__}")
        for i, (m, w) in enumerate(zip(got, want)):
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(w.shape):
                raise Mismatch(f"mask {i} must be a tensor of shape {tuple(w.shape)}")
        per_layer = [float((~m.bool()).float().mean()) for m in got]
        if sparsity > 0 and max(per_layer) - min(per_layer) < 0.05:
            raise Mismatch(f"sparsity={sparsity}: every layer lost the same fraction ({per_layer[0]:.2f}) — that is "
                           "layer-wise pruning; rank all weights together with one threshold")
        removed = sum(int((~m.bool()).sum()) for m in got)
        if removed != round(sparsity * total):
            hint = " (int() truncates; round the count)" if removed == int(sparsity * total) else ""
            raise Mismatch(f"sparsity={sparsity}: you remove {removed} of {total} weights; expected exactly "
                           f"round({sparsity} × {total}) = {round(sparsity * total)}{hint}")
        for i, (m, w) in enumerate(zip(got, want)):
            if not torch.equal(m.bool(), w):
                raise Mismatch(f"sparsity={sparsity}: mask {i} keeps different weights than the global |w| ranking "
                               "(prune the smallest absolute values, keep the largest)")
    return "one global |w| threshold, exact count, small-scale layers pruned hardest"


# ------------------------------------------------------------------------------------------ 04/05: graphs

def _kit_parity(reference, output, mask=None) -> dict:
    from labkit.export.onnx import parity

    return parity(reference, output, mask)


PARITY_KEYS = {"max_abs_diff", "worst", "cosine", "within_tolerance"}


def _check_parity(fn: Callable) -> str:
    g = _gen(8)
    ref = torch.randn(6, 16, 32, generator=g)
    full = torch.ones(6, 16, dtype=torch.long)
    padded = full.clone()
    padded[2, 10:] = padded[5, 4:] = 0
    garbage = ref.clone()
    garbage[2, 10:] += 50 * torch.randn(6, 32, generator=g)  # padding positions: whatever the runtime left there
    garbage[5, 4:] = 0
    edge = ref.clone()
    big = torch.unravel_index(ref.abs().argmax(), ref.shape)  # a large |ref|: a too-loose rtol would let it pass
    edge[big] += 1e-4 + 1e-3 * ref[big].abs() + 1e-5  # just outside atol + rtol·|ref|
    cases = [("identical", ref.clone(), full), ("small noise", ref + 1e-6 * torch.randn(ref.shape, generator=g), full),
             ("one row flipped", torch.cat([-ref[:1], ref[1:]]), full), ("scaled", ref * 3, full),
             # each token scaled by its own positive factor: every token's cosine is 1, each row's is not
             ("tokens scaled unevenly", ref * (0.1 + torch.rand(6, 16, 1, generator=g) * 4), full),
             ("garbage at padded positions only", garbage, padded), ("one element just outside tolerance", edge, full)]
    hints = {"max_abs_diff": "the largest |reference - output| over the real (mask = 1) positions only",
             "worst": "the index (batch, token, feature) of that largest difference",
             "cosine": "cosine per row — one row per batch item, its real tokens flattened — then the mean",
             "within_tolerance": "every real element within atol + rtol·|reference| (atol 1e-4, rtol 1e-3)"}
    for what, out, mask in cases:
        got = fn(ref, out.numpy(), mask.numpy())  # ORT returns numpy arrays: the check must take them
        want = _kit_parity(ref, out, mask)
        if not isinstance(got, dict) or set(got) != PARITY_KEYS:
            raise Mismatch(f"return a dict with exactly the keys {sorted(PARITY_KEYS)}")
        real_diff = (ref - out).abs() * mask[..., None]
        for key in ("max_abs_diff", "cosine", "within_tolerance", "worst"):
            g_, w_ = got[key], want[key]
            if key == "worst":  # any position holding the largest difference will do (ties: all zeros)
                try:
                    same = bool(real_diff[tuple(int(i) for i in g_)] == real_diff.max())
                except (TypeError, IndexError, ValueError):
                    same = False
            elif key == "within_tolerance":
                same = bool(g_) == w_
            else:
                same = math.isclose(float(g_), w_, rel_tol=1e-4, abs_tol=1e-5)
            if not same:
                raise Mismatch(f"{what}: your {key} is {g_!r}, the kit's {w_!r} — {hints[key]}")
    return ("the largest difference, where it is, row cosine and the tolerance verdict, over real tokens only, "
            "from torch tensors or numpy arrays")


def _kit_fuse_bias_gelu(nodes: list[dict], constants: dict[str, tuple], graph_outputs: list[str]) -> list[dict]:
    from labkit.export.fusion import fuse_bias_gelu

    return fuse_bias_gelu(nodes, constants, graph_outputs)


def _n(op: str, inputs: list[str], output: str, **attrs: Any) -> dict:
    return {"op": op, "inputs": inputs, "output": output, "attrs": attrs}


def _fusion_cases() -> list[tuple[str, list[dict], dict[str, tuple], list[str]]]:
    c = {"W": (8, 8), "W2": (8, 8), "b": (8,), "b2": (8,), "B": (8, 8)}
    layer = lambda i, bias="b": [_n("MatMul", [f"x{i}", "W"], f"m{i}"), _n("Add", [f"m{i}", bias], f"y{i}"),  # noqa: E731
                                 _n("Gelu", [f"y{i}"], f"z{i}"), _n("MatMul", [f"z{i}", "W2"], f"x{i + 1}")]
    return [
        ("one bias Add feeding a Gelu", layer(0), c, ["x1"]),
        ("the bias on the left of the Add", [_n("Add", ["b", "m"], "y"), _n("Gelu", ["y"], "z")], c, ["z"]),
        ("the sum is read by another node too", layer(0) + [_n("Add", ["y0", "x1"], "r")], c, ["r"]),
        ("a residual Add: no constant, no bias", [_n("Add", ["m", "r"], "y"), _n("Gelu", ["y"], "z")], c, ["z"]),
        ("a 2-D constant is not a bias", layer(0, bias="B"), c, ["x1"]),
        ("the tanh Gelu is FastGelu, not BiasGelu", [_n("Add", ["m", "b"], "y"),
                                                     _n("Gelu", ["y"], "z", approximate="tanh")], c, ["z"]),
        ("the sum is a graph output", layer(0), c, ["x1", "y0"]),
        ("two layers, two fusions", layer(0) + layer(1, bias="b2"), c, ["x2"]),
    ]


def _canonical(nodes: Any) -> list[tuple]:
    return [(n["op"], tuple(n["inputs"]), n["output"]) for n in nodes]


def _check_fuse_bias_gelu(fn: Callable) -> str:
    for what, nodes, consts, outs in _fusion_cases():
        got = fn(copy.deepcopy(nodes), dict(consts), list(outs))
        want = _kit_fuse_bias_gelu(copy.deepcopy(nodes), consts, outs)
        if not isinstance(got, list) or not all(isinstance(n, dict) and {"op", "inputs", "output"} <= n.keys()
                                                for n in got):
            raise Mismatch(f"{what}: return the new list of nodes (dicts with op, inputs, output)")
        produced = {n["output"] for n in nodes}
        seen = set()
        for n in got:  # topological order: every input exists before it is read
            missing = [i for i in n["inputs"] if i in produced and i not in seen]
            if missing:
                raise Mismatch(f"{what}: node {n['op']} reads {missing} before any node writes it — keep the "
                               "nodes in topological order")
            seen.add(n["output"])
        if sorted(_canonical(got)) != sorted(_canonical(want)):
            g_ops = sorted(n["op"] for n in got)
            w_ops = sorted(n["op"] for n in want)
            raise Mismatch(f"{what}: your graph has {g_ops}, the kit's {w_ops}"
                           + ("" if g_ops != w_ops else " (same ops, different wiring: BiasGelu takes (x, bias) "
                              "and writes the Gelu's output name)"))
    return ("Add(x, bias) → exact Gelu becomes BiasGelu only where that is legal: a 1-D constant bias, a sum "
            "nobody else reads, not a graph output, not the tanh form")


def _kit_choose(rows: list[dict], within: float, baseline: str = "dense") -> str:
    """The name of the smallest (``weight_bytes``) variant whose accuracy is at most ``within`` below the row
    named ``baseline``; among equal sizes, the more accurate one."""
    from labkit import select

    tagged = [{**r, "model": "m"} for r in rows]
    return select.select(tagged, model="m", metric="accuracy", within=within, cost="weight_bytes",
                         baseline=baseline).variant["name"]


def _stage_rows(spec: list[tuple[str, float, int]]) -> list[dict]:
    return [{"name": n, "accuracy": a, "weight_bytes": b} for n, a, b in spec]


def _check_choose(fn: Callable) -> str:
    cases = [
        ("the smallest variant loses too much", 0.015, [("dense", 0.975, 86_000), ("pruned", 0.968, 40_000),
                                                        ("int8", 0.964, 12_000), ("tiny", 0.90, 3_000)]),
        ("a loss exactly at the limit is allowed (>=, not >)", 0.25, [("dense", 0.5, 100), ("a", 0.25, 50),
                                                                      ("b", 0.125, 20)]),
        ("equal sizes: the more accurate wins", 0.05, [("dense", 0.9, 100), ("x", 0.86, 40), ("y", 0.88, 40)]),
        ("nothing smaller qualifies: keep dense", 0.001, [("dense", 0.99, 100), ("q", 0.95, 10)]),
        ("better than dense is fine", 0.0, [("dense", 0.90, 100), ("distilled", 0.91, 30), ("z", 0.89, 5)]),
        ("rows in any order", 0.015, [("int8", 0.964, 12_000), ("tiny", 0.90, 3_000), ("dense", 0.975, 86_000),
                                      ("pruned", 0.968, 40_000)]),
        ("the baseline is the row named by baseline=", 0.02, [("teacher", 0.97, 90), ("dense", 0.99, 80),
                                                               ("student", 0.955, 40)]),
    ]
    for what, within, spec in cases:
        rows, base = _stage_rows(spec), "teacher" if "baseline=" in what else "dense"
        got, want = fn([dict(r) for r in rows], within, base), _kit_choose(rows, within, base)
        if got != want:
            raise Mismatch(f"{what} (within={within}, baseline={base!r}): you chose {got!r}, the kit chooses "
                           f"{want!r} — keep the variants with accuracy >= {base}'s - within, then take the smallest "
                           "weight_bytes "
                           "(on a tie in bytes, the more accurate)")
    return "the smallest variant within the allowed accuracy loss, as labkit.select chooses it"


# ------------------------------------------------------------------------------------------ registry

EXERCISES: dict[str, tuple[str, Callable, Callable]] = {
    # name: (notebook, kit's solution, checker)
    "time_fn": ("00", kit_time_fn, _check_timing),
    "quantize_asymmetric": ("01", prim.quantize_asymmetric, _check_quantize_asymmetric),
    "dequantize_asymmetric": ("01", prim.dequantize_asymmetric, _check_dequantize_asymmetric),
    "pack_int4": ("01", prim.pack_int4, _check_pack_int4),
    "unpack_int4": ("01", prim.unpack_int4, _check_unpack_int4),
    "double_quantize": ("01", prim.double_quantize, _check_double_quantize),
    "append_slot": ("06", kit_append_slot, _check_append_slot),
    "paged_attention": ("06", kit_paged_attention, _check_paged_attention),
    "global_magnitude_masks": ("02", _kit_global_masks, _check_global_masks),
    "hinton_loss": ("03", _kit_hinton, _check_hinton),
    "parity": ("04", _kit_parity, _check_parity),
    "fuse_bias_gelu": ("05", _kit_fuse_bias_gelu, _check_fuse_bias_gelu),
    "choose": ("07", _kit_choose, _check_choose),
}


def available(notebook: str | None = None) -> list[str]:
    """Exercise names (of one notebook, e.g. ``"01"``, or all)."""
    return [n for n, (nb, _, _) in EXERCISES.items() if notebook is None or nb == notebook]


def solution(name: str) -> Callable:
    """The kit's own function for an exercise."""
    return _entry(name)[1]


def _entry(name: str) -> tuple[str, Callable, Callable]:
    if name not in EXERCISES:
        raise LabkitError(f"exercise name={name!r} does not exist; available: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def verify(name: str, fn: Callable) -> Verdict:
    """Run the checker without printing: ``Verdict(ok, message, fallback)``."""
    _, _, checker = _entry(name)
    try:
        return Verdict(name, True, checker(fn), fallback=False)
    except NotImplementedError:
        return Verdict(name, False, "not written yet (the stub raises NotImplementedError)", fallback=True)
    except Mismatch as exc:
        return Verdict(name, False, str(exc), fallback=True)
    except Exception as exc:  # noqa: BLE001 - a learner's bug is reported, never a crash of the notebook
        return Verdict(name, False, f"your function raised {type(exc).__name__}: {exc}", fallback=True)


def check(name: str, fn: Callable) -> Callable:
    """Check a learner's function, print ✓ or what differs, and return the function to go on with."""
    v = verify(name, fn)
    if v.ok:
        print(f"✓ {name}: {v.message}")
        return fn
    print(f"✗ {name}: {v.message}\n  → the notebook goes on with the kit's version "
          f"(labkit.exercises.solution({name!r})); fix yours and run this cell again.")
    return solution(name)
