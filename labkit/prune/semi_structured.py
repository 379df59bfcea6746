"""2:4 semi-structured sparsity: in every group of 4 consecutive weights along the input dimension, keep 2.

The pattern is what NVIDIA's Sparse Tensor Cores (Ampere and later) accelerate: the GPU stores the 2 kept values
plus 2-bit indices (half the values' bytes, plus metadata) and multiplies at up to twice the dense rate. On a CPU
nothing runs faster — the mask still costs accuracy, which is what can be measured there. On a supporting GPU,
:func:`to_semi_structured` swaps the masked fp16/bf16 weights for ``torch.sparse.to_sparse_semi_structured``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from labkit import LabkitError
from labkit.prune.unstructured import apply_masks, make_permanent, prunable_layers
from labkit.skip import DEFAULT_SKIP


def two_four_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask with the ``n`` largest-``|w|`` of every ``m`` consecutive weights of each row (magnitude N:M)."""
    if weight.shape[-1] % m:
        raise LabkitError(f"weight has {weight.shape[-1]} input features; {n}:{m} sparsity needs a multiple of {m}")
    groups = weight.detach().abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.view_as(weight)


def is_2_4(weight: torch.Tensor) -> bool:
    """True when no group of 4 consecutive weights of a row has more than 2 non-zeros."""
    return weight.shape[-1] % 4 == 0 and int((weight.reshape(-1, 4) != 0).sum(1).max()) <= 2


def apply_2_4(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, torch.Tensor]:
    """Mask every Linear layer (not ``skip``) to 2:4 through ``torch.nn.utils.prune``; returns the masks."""
    masks = {name: two_four_mask(m.weight) for name, m in prunable_layers(model, skip) if isinstance(m, nn.Linear)}
    if not masks:
        raise LabkitError("no Linear layer to make 2:4 sparse")
    apply_masks(model, masks)
    return masks


def semi_structured_support() -> tuple[bool, str]:
    """Whether this machine can run 2:4 sparse matmuls, and why not."""
    if not torch.cuda.is_available():
        return False, ("no CUDA GPU: 2:4 sparse kernels need an NVIDIA GPU with compute capability 8.0+ (A100, "
                       "H100, L4, RTX 30xx+); on Colab pick an A100 or L4 runtime")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU {torch.cuda.get_device_name()} is sm_{major}{minor}; 2:4 sparse kernels need sm_80+"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} lacks torch.sparse.to_sparse_semi_structured (needs 2.1+)"
    # torch has two 2:4 backends: cuSPARSELt and CUTLASS kernels built for sm_8x only, so Hopper (sm_90) and newer
    # need cuSPARSELt (torch's semi-structured docs; torch.sparse.semi_structured picks it when available).
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_lt = bool(cusparselt and cusparselt.is_available())
    if major >= 9 and not has_lt:
        return False, (f"GPU {torch.cuda.get_device_name()} is sm_{major}{minor}: torch's CUTLASS 2:4 kernels cover "
                       "sm_8x only and this torch build has no cuSPARSELt")
    backend = "cuSPARSELt" if has_lt else "CUTLASS"
    return True, f"{torch.cuda.get_device_name()} (sm_{major}{minor}, {backend})"


def to_semi_structured(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> int:
    """Replace each 2:4-masked Linear weight (fp16/bf16, on CUDA) with its compressed semi-structured form, so
    matmuls use Sparse Tensor Cores. Returns the number of layers converted."""
    ok, why = semi_structured_support()
    if not ok:
        raise LabkitError(f"2:4 sparse kernels are not available here: {why}")
    from torch.sparse import to_sparse_semi_structured

    n = 0
    for name, m in prunable_layers(model, skip):
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach()
        if w.dtype not in (torch.float16, torch.bfloat16) or w.device.type != "cuda":
            raise LabkitError(f"layer {name!r} is {w.dtype} on {w.device}; convert the model to fp16/bf16 on CUDA")
        if not is_2_4(w):
            raise LabkitError(f"layer {name!r} is not 2:4 sparse; call apply_2_4 and make_permanent first")
        m.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        n += 1
    return n


def matmul_speedup(features: int = 4096, tokens: int = 2048, repeats: int = 5,
                   device: torch.device | str | None = None) -> dict:
    """Time one fp16 ``features x features`` Linear on ``tokens`` rows, dense vs 2:4 semi-structured, on this GPU
    (rotated repeats, median). Without support, or when ``device`` is not a GPU, ``{"status": "skipped",
    "reason": ...}``; a kernel that fails at run time is a skip with its error, not a crash of the experiment."""
    if device is not None and torch.device(device).type != "cuda":
        return {"status": "skipped", "reason": f"the experiment runs on {device}; 2:4 kernels need a CUDA GPU"}
    ok, why = semi_structured_support()
    if not ok:
        return {"status": "skipped", "reason": why}
    try:
        return _time_2_4(features, tokens, repeats, why)
    except RuntimeError as exc:
        return {"status": "skipped", "reason": f"2:4 kernel failed on {why}: {str(exc)[:300]}"}


def _time_2_4(features: int, tokens: int, repeats: int, why: str) -> dict:

    from labkit.measure import compare_latency

    torch.manual_seed(0)
    dense = nn.Linear(features, features, bias=False).half().cuda().eval()
    apply_2_4(dense, skip=())
    make_permanent(dense)
    sparse = nn.Linear(features, features, bias=False).half().cuda().eval()
    sparse.weight = nn.Parameter(dense.weight.detach().clone(), requires_grad=False)
    to_semi_structured(sparse, skip=())
    x = torch.randn(tokens, features, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        max_diff = float((sparse(x) - dense(x)).abs().max())
        lat = compare_latency({"dense-fp16": lambda: dense(x), "2:4-fp16": lambda: sparse(x)}, repeats=repeats,
                              inner=20, warmup=3, device="cuda")
    return {"status": "ok", "device": why, "shape": f"{tokens} x {features} @ {features} x {features}",
            "max_abs_diff": max_diff, **{f"{k}_ms": v["latency_ms_median"] for k, v in lat.items()},
            "speedup": lat["dense-fp16"]["latency_ms_median"] / lat["2:4-fp16"]["latency_ms_median"]}
