"""Tensor parallelism for the paged engine (``LLM(..., tensor_parallel_size=k)``, vLLM's name), with
``torch.distributed``: gloo between CPU processes, NCCL between GPUs.

Megatron-LM's split of a Llama layer over ``k`` ranks: q/k/v and gate/up are *column*-parallel (each rank holds
``1/k`` of the output features: whole attention heads, a slice of the MLP's intermediate width), o and down are
*row*-parallel (each rank holds the matching ``1/k`` of the input features), so each rank computes a partial sum of
the layer's output and **one all-reduce after attention and one after the MLP** make it whole — two all-reduces a
layer, each of ``hidden × dtype bytes`` a token. KV heads are split with their query heads, so each rank keeps
``1/k`` of the KV cache. The embedding and the head stay replicated: SmolLM2 ties them (one matrix), and splitting
the vocabulary would add an all-gather of the logits for a matrix that is 5 % of a 135M model's bytes per rank.

The engine's process is rank 0: it schedules, and before each step broadcasts the step (copy-on-write copies, then
the flat batch) to the ``k - 1`` worker processes; every rank runs the same forward over its shard and its own KV
pool under the same block tables; rank 0 samples.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from labkit import LabkitError
from labkit.llama import Dims

TIMEOUT = datetime.timedelta(seconds=120)  # a rank that dies surfaces as an error, not a hang


def allowed_sizes(config: Any) -> list[int]:
    """The tensor-parallel sizes that split a model evenly: they divide the query heads, the KV heads and the MLP's
    intermediate width (SmolLM2-135M: 9 query and 3 KV heads, so 1 and 3)."""
    d = Dims.of(config)
    return [k for k in range(1, d.kv_heads + 1)
            if d.heads % k == 0 and d.kv_heads % k == 0 and config.intermediate_size % k == 0]


def check_size(config: Any, k: int) -> None:
    if k not in allowed_sizes(config):
        d = Dims.of(config)
        raise LabkitError(f"tensor_parallel_size={k} does not split this model evenly ({d.heads} query heads, "
                          f"{d.kv_heads} KV heads, intermediate size {config.intermediate_size}); allowed: "
                          f"{', '.join(map(str, allowed_sizes(config)))}")


def _slice(linear: nn.Module, rank: int, k: int, dim: int) -> nn.Linear:
    """Rank ``rank``'s ``1/k`` of a linear layer's output features (``dim=0``) or input features (``dim=1``)."""
    if type(linear) is not nn.Linear or linear.bias is not None:
        raise LabkitError(f"tensor parallelism shards plain bias-free nn.Linear layers, not {type(linear).__name__}: "
                          "shard first, or serve the quantized model with tensor_parallel_size=1")
    w = linear.weight.detach()
    n = w.shape[dim] // k
    part = w.narrow(dim, rank * n, n).clone()
    out = nn.Linear(part.shape[1], part.shape[0], bias=False, dtype=part.dtype, device=part.device)
    out.weight = nn.Parameter(part, requires_grad=False)
    return out


def shard(model: nn.Module, rank: int, k: int) -> nn.Module:
    """A copy of ``model`` holding rank ``rank``'s shard: its heads' q/k/v rows and o columns, its slice of
    gate/up rows and down columns; the config says the local head counts and width."""
    check_size(model.config, k)
    d = Dims.of(model.config)
    out = copy.deepcopy(model)
    for layer in out.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        a.q_proj, a.k_proj, a.v_proj = (_slice(m, rank, k, 0) for m in (a.q_proj, a.k_proj, a.v_proj))
        a.o_proj = _slice(a.o_proj, rank, k, 1)
        mlp.gate_proj, mlp.up_proj = _slice(mlp.gate_proj, rank, k, 0), _slice(mlp.up_proj, rank, k, 0)
        mlp.down_proj = _slice(mlp.down_proj, rank, k, 1)
    out.config.num_attention_heads, out.config.num_key_value_heads = d.heads // k, d.kv_heads // k
    out.config.head_dim, out.config.intermediate_size = d.head_dim, out.config.intermediate_size // k
    return out


class AllReduce:
    """The ``linear`` hook of the layer loop: a row-parallel layer's output (o, down) is all-reduced across the
    ranks before the residual add; every other layer runs as it is. Counts the bytes it all-reduces."""

    def __init__(self, model: nn.Module) -> None:
        self.row_parallel = {id(m) for ly in model.model.layers for m in (ly.self_attn.o_proj, ly.mlp.down_proj)}
        self.bytes = 0
        self.calls = 0

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = module(x)
        if id(module) in self.row_parallel:
            dist.all_reduce(y)
            self.bytes += y.numel() * y.element_size()
            self.calls += 1
        return y


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, k: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k,
                            timeout=TIMEOUT)


def _to(batch: Any, device: torch.device) -> Any:
    """The batch (a dataclass of tensors and lists of tuples of tensors) on ``device``."""
    import dataclasses

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        return x

    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def _worker(rank: int, k: int, port: int, part: nn.Module, config: Any, device: str, threads: int) -> None:
    """A rank ``>= 1``: its shard and KV pool; runs every step rank 0 broadcasts until told to stop."""
    from labkit.serve.kv_cache import Int8KVCache, KVCache
    from labkit.serve.model import PagedLlama

    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _init(rank, k, port, dev)
    model = PagedLlama(part.to(dev), fuse=config.stack_projections, max_model_len=config.max_model_len)
    model.linear = AllReduce(part)
    cache = Int8KVCache if config.kv_cache_dtype == "int8" else KVCache
    kv = cache(model.num_layers, config.num_blocks, config.block_size, model.num_kv_heads, model.head_dim,
               model.dtype, dev)
    try:
        while True:
            msg: list[Any] = [None]
            dist.broadcast_object_list(msg, src=0)
            op = msg[0]
            if op is None:
                break
            if op[0] == "copy":
                kv.copy_block(op[1], op[2])
            else:
                model(_to(op[1], dev), kv)
    finally:
        dist.destroy_process_group()


class TensorParallel:
    """Rank 0's side: starts the ``k - 1`` workers, shards the model, and wraps rank 0's model and KV cache so
    each step reaches every rank first. ``close()`` stops the workers (the engine's ``close``)."""

    def __init__(self, model: nn.Module, k: int, config: Any) -> None:
        import torch.multiprocessing as mp

        check_size(model.config, k)
        if dist.is_initialized():
            raise LabkitError("a tensor-parallel engine is already running in this process (torch.distributed is "
                              "initialized); close it first (llm.close())")
        device = next(model.parameters()).device
        self.k, self.port = k, _free_port()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // k)
        ctx = mp.get_context("spawn")
        self.workers = []
        for rank in range(1, k):
            dev = f"cuda:{rank}" if device.type == "cuda" else "cpu"
            p = ctx.Process(target=_worker, args=(rank, k, self.port, shard(model, rank, k).cpu(), config, dev,
                                                  threads), daemon=True)
            p.start()
            self.workers.append(p)
        self.part = shard(model, 0, k)
        _init(0, k, self.port, device)
        self.reducer = AllReduce(self.part)
        self.closed = False

    def wrap(self, paged: nn.Module, kv: Any) -> tuple[nn.Module, Any]:
        """Rank 0's model and KV cache, each broadcasting what it does to the workers first."""
        paged.linear = self.reducer
        return _Broadcasting(paged, self), _BroadcastingKV(kv, self)

    def send(self, op: Any) -> None:
        dist.broadcast_object_list([op], src=0)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.send(None)
        finally:
            for p in self.workers:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            dist.destroy_process_group()


class _Broadcasting(nn.Module):
    def __init__(self, paged: nn.Module, tp: TensorParallel) -> None:
        super().__init__()
        self.paged, self.tp = paged, tp

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.paged, name)

    def forward(self, batch: Any, kv: Any) -> torch.Tensor:
        self.tp.send(("forward", _to(batch, torch.device("cpu"))))
        return self.paged(batch, kv.inner if isinstance(kv, _BroadcastingKV) else kv)


class _BroadcastingKV:
    def __init__(self, inner: Any, tp: TensorParallel) -> None:
        self.inner, self.tp = inner, tp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def copy_block(self, src: int, dst: int) -> None:
        self.tp.send(("copy", src, dst))
        self.inner.copy_block(src, dst)
