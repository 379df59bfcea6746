"""The two ceilings every speed in the kit is measured against: how fast this machine reads memory, and how
fast it multiplies matrices.

Decoding one token at batch 1 reads every weight once and does about 2 FLOPs per weight, so it can be no faster
than ``weight bytes / bandwidth`` (memory-bound) and no faster than ``2 x params / GEMM FLOP/s`` (compute-bound);
whichever is slower is the ceiling. A batch of B requests reads the weights once for B tokens, so the memory
ceiling on tokens/s grows with B until the math catches up. The numbers here are *measured* on this machine
(a large reduction and a large matmul), not a datasheet's peak.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from labkit import LabkitError, measure


@dataclass(frozen=True)
class Ceilings:
    device: str
    bandwidth_bytes_per_s: float  # a read-only sweep over a tensor far larger than the caches
    matmul_flops_per_s: float  # a square GEMM of side matmul_n in matmul_dtype
    matmul_dtype: str
    threads: int
    matmul_n: int = 1024

    @property
    def gemm_label(self) -> str:
        """What the GEMM ceiling measured, in words a notebook can print."""
        return f"{self.matmul_dtype} GEMM throughput (a {self.matmul_n} x {self.matmul_n} matmul on {self.device})"

    def decode_tokens_per_s(self, weight_bytes: int, params: int, batch: int = 1) -> dict[str, float]:
        """The memory and compute ceilings on decode tokens/s for ``batch`` requests sharing each weight read."""
        if batch < 1:
            raise LabkitError(f"batch={batch} must be at least 1")
        memory = batch * self.bandwidth_bytes_per_s / weight_bytes
        compute = self.matmul_flops_per_s / (2 * params)
        return {"memory_bound_tok_s": memory, "compute_bound_tok_s": compute, "ceiling_tok_s": min(memory, compute)}

    def as_dict(self) -> dict[str, float | str | int]:
        return {"device": self.device, "bandwidth_gb_s": self.bandwidth_bytes_per_s / 1e9,
                "matmul_gflop_s": self.matmul_flops_per_s / 1e9, "matmul_dtype": self.matmul_dtype,
                "matmul_n": self.matmul_n,
                "threads": self.threads}


def memory_bandwidth(device: str | torch.device = "cpu", mib: int = 512, repeats: int = 7) -> float:
    """Bytes/s of a sum over a ``mib``-MiB fp32 tensor (read once per call). A ceiling is the best the machine
    did, so this is the fastest of ``repeats`` calls, not their median."""
    if mib < 1:
        raise LabkitError(f"mib={mib} must be at least 1")
    x = torch.ones(mib * 2**20 // 4, device=device)
    t = measure.benchmark(lambda: x.sum(), warmup=2, repeats=repeats, device=x)
    return x.numel() * 4 / min(t.times_s)


def matmul_flops(device: str | torch.device = "cpu", n: int = 1024, dtype: torch.dtype | None = None,
                 repeats: int = 7) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul (2 n^3 FLOPs; the fastest of ``repeats``, as a ceiling).
    TF32 stays as torch has it."""
    if n < 1:
        raise LabkitError(f"n={n} must be at least 1")
    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure.benchmark(lambda: a @ b, warmup=2, repeats=repeats, device=a)
    return 2 * n**3 / min(t.times_s)


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one batch-1 decode step must read: every stored weight (packed where quantized), except embedding
    tables, which a step reads one row of — unless an output head shares the table (tied weights), which reads
    all of it. The KV cache adds ``2 x layers x context x kv_width`` more, small at the short contexts timed."""
    from labkit.measure import _storage_key, tensor_bytes, weight_bytes

    used_elsewhere = {_storage_key(t) for m in model.modules() if not isinstance(m, torch.nn.Embedding)
                      for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    lookups = {_storage_key(p): tensor_bytes(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
               for p in m.parameters(recurse=False)}
    return weight_bytes(model) - sum(b for key, b in lookups.items() if key not in used_elsewhere)


@torch.no_grad()
def forward_flops(model: torch.nn.Module, **inputs: torch.Tensor) -> int:
    """FLOPs of one ``model(**inputs)`` as torch counts them (matmuls, attention; element-wise ops are free)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return int(counter.get_total_flops())


@functools.cache
def _bandwidth(device: str) -> float:
    """The device's read bandwidth, measured once per process whatever dtypes its GEMM ceiling is asked in."""
    return memory_bandwidth(device, mib=1024 if torch.device(device).type == "cuda" else 512)


@functools.cache
def ceilings(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Ceilings:
    """This machine's measured ceilings on ``device`` (measured once per process: about a second on a CPU). The GEMM
    runs in ``dtype``: compare a model's FLOP/s with the ceiling of the dtype it computes in (an fp32 model against a
    bf16 GEMM would look three to fifteen times slower than it is)."""
    dev = torch.device(device)
    n = 4096 if dev.type == "cuda" else 1024
    return Ceilings(device=str(dev), bandwidth_bytes_per_s=_bandwidth(str(dev)),
                    matmul_flops_per_s=matmul_flops(dev, n=n, dtype=dtype), matmul_n=n,
                    matmul_dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())
