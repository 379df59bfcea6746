"""A stand-in accelerator for proving, on a CPU, that code keeps its tensors on one device.

``install()`` makes ``labkit.env.default_device()`` answer ``cpu:0`` (through ``LABKIT_DEVICE``), a device that torch
treats as the CPU but that compares unequal to ``torch.device("cpu")``, and pushes a ``TorchFunctionMode`` that keeps
a tag on every tensor that lives "on the accelerator":

- ``t.to(cpu:0)`` / ``.to(tagged_tensor)`` / a factory call with ``device=cpu:0`` give a tagged tensor (a new
  tensor object, so the CPU original stays untagged, as a real copy to a GPU would leave it);
- ``t.cpu()`` / ``t.to("cpu")`` of a tagged tensor give an untagged copy;
- every other op's results are tagged when its tensor inputs are; an op whose inputs mix tagged and untagged
  tensors of one or more dimensions raises :class:`DeviceMixError`, as CUDA would ("Expected all tensors to be on
  the same device"). 0-dim CPU tensors mix freely (CUDA allows that), ``copy_`` crosses devices (CUDA allows it),
  and an index may be a CPU tensor (CUDA allows it);
- ``.numpy()`` of a tagged tensor raises, as it does for a CUDA tensor (``numpy(force=True)`` copies, as on CUDA);
- a tagged tensor's ``.device`` answers ``cpu:0``, so ``torch.zeros(..., device=x.device)`` is tagged too.

What it cannot catch: kernels that exist only on CUDA (or only on the CPU), dtypes a GPU lacks (bf16 on a T4),
memory limits, asynchronous execution and timing, ops that run in other threads (the mode is per thread: the
serving engine's background thread runs unchecked), and code that tests ``device.type == "cuda"`` (the stand-in's
type is ``cpu``, so such branches take their CPU side).
"""

from __future__ import annotations

import os

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

STANDIN = torch.device("cpu", 0)
_TAG = "_labkit_on_accelerator"
_DEVICE_GET = torch.Tensor.device.__get__
_DATA_SET = torch.Tensor.data.__set__
# ops that only compare metadata, and ops CUDA lets cross devices (an index may be a CPU tensor; copy_ copies)
_ALLOWED = {
    torch._has_compatible_shallow_copy_type,
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.copy_,
    torch.Tensor.index_put_,
    torch.Tensor.index_put,
}


class DeviceMixError(RuntimeError):
    """An op mixed accelerator tensors with CPU tensors (CUDA would raise here)."""


def on_accelerator(t: torch.Tensor) -> bool:
    return bool(getattr(t, _TAG, False))


def _is_standin(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.Tensor):
        return on_accelerator(device)
    try:
        return torch.device(device) == STANDIN
    except (RuntimeError, TypeError):
        return False


def _is_standin_device(value) -> bool:
    return isinstance(value, (torch.device, str)) and _is_standin(value)


def _is_cpu(device) -> bool:
    try:
        return torch.device(device) == torch.device("cpu")
    except (RuntimeError, TypeError):
        return False


def _target(args, kwargs):
    """Where a ``Tensor.to`` call sends its tensor: 'acc', 'cpu' or None (dtype only)."""
    for d in list(args[1:]) + [kwargs.get("device")]:
        if d is None or isinstance(d, torch.dtype):
            continue
        if _is_standin(d):
            return "acc"
        if isinstance(d, torch.Tensor) or _is_cpu(d):
            return "cpu"
    return None


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensors among an op's arguments, one level into lists, tuples and dicts (a fast path: most ops)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple, dict)):
            found.extend(t for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor))
    return found


def _tag(out, value: bool):
    for t in ((out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]):
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _TAG, value)
            except (AttributeError, RuntimeError):
                pass
    return out


class AcceleratorMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        _keep_tag_through_parameters()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return STANDIN if on_accelerator(args[0]) else func(*args)
        if func == _DATA_SET:
            func(*args)
            setattr(args[0], _TAG, on_accelerator(args[1]))
            return None
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and on_accelerator(args[0]) \
                and not kwargs.get("force"):  # numpy(force=True) copies to the host, on CUDA too
            raise DeviceMixError("can't convert an accelerator tensor to numpy: call .cpu() first "
                                 "(a CUDA tensor raises the same)")
        if func is torch.Tensor.to or func is torch.Tensor.cpu:
            where = "cpu" if func is torch.Tensor.cpu else _target(args, kwargs)
            # torch copies a cpu tensor sent to "cpu:0"; a GPU tensor sent to its own device is returned as is
            plain = [torch.device("cpu") if _is_standin_device(a) else a for a in args]
            out = func(*plain, **{k: torch.device("cpu") if _is_standin_device(v) else v for k, v in kwargs.items()})
            if where is None:
                return _tag(out, on_accelerator(args[0]))
            if out is args[0] and on_accelerator(out) != (where == "acc"):
                # a move between devices: same storage here, but a new tensor object so the original keeps its tag
                with torch._C.DisableTorchFunction():
                    out = out.view_as(out) if where == "acc" else out.clone()
            return _tag(out, where == "acc")
        tensors = _tensors(args, kwargs)
        big = [t for t in tensors if t.dim() > 0]
        tagged = [on_accelerator(t) for t in big]
        if any(tagged) and not all(tagged) and func not in _ALLOWED:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            shapes = ", ".join(f"{tuple(t.shape)} on {'the accelerator' if a else 'cpu'}"
                               for t, a in zip(big, tagged))
            raise DeviceMixError(f"{name} mixes devices: {shapes}")
        out = func(*args, **kwargs)
        acc = any(on_accelerator(t) for t in tensors) or _is_standin(kwargs.get("device"))
        if func in (torch.Tensor.__setitem__, torch.Tensor.copy_) or not acc:
            return out
        return _tag(out, True)


def _keep_tag_through_parameters() -> None:
    """``nn.Parameter(t)`` and ``copy.deepcopy(param)`` build new tensor objects outside torch's function dispatch; a
    parameter made from (or copied from) an accelerator tensor lives on the accelerator too."""
    param = torch.nn.Parameter
    if getattr(param, "_labkit_tags", False):
        return
    new, deepcopy = param.__new__, param.__deepcopy__

    def __new__(cls, data=None, requires_grad=True):
        out = new(cls, data, requires_grad)
        if data is not None and on_accelerator(data):
            setattr(out, _TAG, True)
        return out

    def __deepcopy__(self, memo):
        out = deepcopy(self, memo)
        if on_accelerator(self):
            setattr(out, _TAG, True)
        return out

    param.__new__, param.__deepcopy__, param._labkit_tags = __new__, __deepcopy__, True


def install() -> AcceleratorMode:
    """Enter the mode for the rest of this thread's life (an IPython startup file calls it before any cell)."""
    os.environ["LABKIT_DEVICE"] = str(STANDIN)
    mode = AcceleratorMode()
    mode.__enter__()
    return mode
