"""Prepacked weights: a linear layer's weight laid out once, ahead of time, in the blocked format oneDNN reads.

``F.linear`` on a CPU hands oneDNN (PyTorch's CPU matmul library) a plain row-major weight. For bf16 on a CPU with
AMX, oneDNN must first reorder that weight into its tile layout, and it does so on every call; with one token a
step the reorder costs more than the multiplication (lesson 00 times it). ``torch.ops.mkldnn._reorder_linear_weight``
does the reorder once; ``torch.ops.mkldnn._linear_pointwise`` then multiplies by the packed weight. These are the
two operators ``torch.compile`` emits for a bf16 linear layer on a CPU when it freezes the weights (Inductor's
``freezing``; an fp32 weight it packs with MKL instead, unless the batch size varies, as an engine's does); here
they are called by hand so the engine keeps its readable Python loop.

:class:`PackedLinear` is ``nn.Linear`` with its weight packed; :class:`Packer` packs the layers an engine or a
decoder calls, without changing the model it was given (the model may be shared). Outputs equal ``F.linear``'s
in bf16 bit for bit in the kit's tests, and agree to fp32 rounding in fp32. CPU only: on CUDA, cuBLAS reads
the weight as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from labkit import LabkitError

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear (every x86-64 and aarch64 CPU build of PyTorch does)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def check(device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse, naming what is allowed, where packing cannot run: off the CPU, an integer dtype, no oneDNN."""
    device = torch.device(device)
    if device.type != "cpu":
        raise LabkitError(f"prepack_weights=True on device={str(device)!r}: packing is oneDNN's CPU layout; on a "
                          "GPU cuBLAS reads the weight as it is, so leave prepack_weights=False there")
    if dtype not in DTYPES:
        raise LabkitError(f"prepack_weights=True needs float32 or bfloat16 weights, not {dtype}")
    if not available():
        raise LabkitError("prepack_weights=True but this torch build has no oneDNN (torch.backends.mkldnn)")


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight is held once in oneDNN's blocked layout; ``forward`` equals ``F.linear``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if type(linear) is not nn.Linear:
            raise LabkitError(f"PackedLinear packs nn.Linear, not {type(linear).__name__}")
        check(linear.weight.device, linear.weight.dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:  # an fp32 head after bf16 layers: cast in and back, as the static decoder does
            return self.forward(x.to(self.dtype)).to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def direct(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``forward`` for inputs of ``dtype`` as one plain function (see ``QuantLinear.direct``); None for another
        dtype (forward casts those)."""
        if dtype != self.dtype:
            return None
        op, w, b = torch.ops.mkldnn._linear_pointwise, self.packed, self.bias
        return lambda x: op(x, w, b, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight, unpacked (a copy: for checks and pictures, not for the hot path)."""
        return self.packed.to_dense()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed"


class Packer:
    """Packed copies of the linear layers an engine calls, keyed by the layer they replace. ``pack_in(container)``
    swaps the ``nn.Linear`` children of a container the caller owns (the engine's stacked q/k/v and gate/up copies);
    ``add(layers)`` packs layers of the caller's model without touching it, and ``linear(module, x)`` (the layer
    loop's hook) runs the packed copy where there is one."""

    def __init__(self) -> None:
        self.packed: dict[int, PackedLinear] = {}

    def pack_in(self, container: nn.Module) -> int:
        """Replace, inside ``container``, every ``nn.Linear`` child with its packed copy; returns how many."""
        n = 0
        for parent in container.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child))
                    n += 1
        return n

    def add(self, layers: Iterable[nn.Module]) -> int:
        """Pack a copy of each ``nn.Linear`` in ``layers`` (others are left to run as they are); returns how many."""
        n = 0
        for layer in layers:
            if type(layer) is nn.Linear and id(layer) not in self.packed:
                self.packed[id(layer)] = PackedLinear(layer)
                n += 1
        return n

    def get(self, module: nn.Module) -> nn.Module:
        """The packed copy of ``module``, or ``module`` itself where it has none."""
        return self.packed.get(id(module), module)

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.get(module)(x)

    def pack_model(self, model: nn.Module, *containers: nn.Module) -> None:
        """Everything a Llama-shaped layer loop multiplies: the ``containers`` it owns (stacked q/k/v and gate/up)
        in place, and packed copies of ``model``'s o, down and output head."""
        for container in containers:
            self.pack_in(container)
        self.add([m for ly in model.model.layers for m in (ly.self_attn.o_proj, ly.mlp.down_proj)] + [model.lm_head])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed copies held beside the model (the stacked copies swapped in place not included)."""
        return sum(p.nbytes for p in self.packed.values())
