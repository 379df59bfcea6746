"""Engine configuration: one dataclass, validated up front."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from typing import Any

from labkit import LabkitError

KV_CACHE_DTYPES = ("auto", "int8")


@dataclass
class EngineConfig:
    """Knobs of the paged engine.

    ``num_blocks=None`` sizes the KV pool for ``max_num_seqs`` sequences of ``max_model_len`` tokens.
    ``paged=False`` switches paging off: each admitted sequence takes one contiguous run of blocks up front,
    as engines without paging must. ``kv_reservation`` says how much: ``"max_model_len"`` for every request
    (an engine that does not know the output length: ``labkit-contiguous``) or ``"exact"``, prompt +
    ``max_tokens`` (the best contiguous policy: ``labkit-contiguous-exact``).
    ``decode_group``: decode sequences attended together in one padded SDPA call, sorted by length; larger
    groups mean fewer calls but more padding (8 is the value the quick serving workload was tuned with on 2 CPU
    cores; on a GPU, where a call costs a kernel launch, larger groups are likely better).
    ``kv_cache_dtype`` (vLLM's argument; its ``"int8"`` value is the kit's own, vLLM offers FP8): ``"auto"``
    stores K/V in the model's dtype, ``"int8"`` as int8 with a
    scale per token and head (:class:`~labkit.serve.kv_cache.Int8KVCache`): the same bytes hold about 2x (bf16) to
    4x (fp32) the tokens, at a small cost in agreement with the model's own tokens.
    ``speculative_config`` (vLLM's name and shape): ``{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4, "prompt_lookup_min": 1}`` makes every decoding sequence guess its next tokens by
    prompt lookup; the step verifies them (greedy output is unchanged; sampling keeps its distribution).
    ``{"method": "draft_model", "model": draft, "num_speculative_tokens": 4}`` has a small Llama-shaped model with the
    target's vocabulary propose instead, with its own KV pool under the same block tables (``drafter.py``).
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 1024
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    paged: bool = True
    kv_reservation: str = "max_model_len"
    decode_group: int = 8
    kv_cache_dtype: str = "auto"
    speculative_config: dict | str | None = None  # a dict, or its JSON text
    stack_projections: bool = True  # q/k/v and gate/up as one matmul each (labkit.stacking); tokens identical
    tensor_parallel_size: int = 1  # vLLM's name: k processes, each 1/k of every layer (serve/tensor_parallel.py)
    prepack_weights: bool = False  # linear weights laid out once in oneDNN's blocked format (CPU; labkit.prepack)

    def __post_init__(self) -> None:
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise LabkitError(f"tensor_parallel_size={self.tensor_parallel_size!r} must be a positive integer "
                              "(1: no tensor parallelism)")
        if self.tensor_parallel_size > 1 and self.speculative_config is not None:
            raise LabkitError("speculative_config with tensor_parallel_size > 1 is not supported by this engine; "
                              "use one or the other")
        if self.speculative_config is not None:
            self.speculative()  # checked now, not at the first step
        if self.prepack_weights and self.tensor_parallel_size > 1:
            raise LabkitError("prepack_weights=True with tensor_parallel_size > 1 is not supported by this engine "
                              "(each rank would pack its own shard); use one or the other")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LabkitError(
                f"kv_cache_dtype={self.kv_cache_dtype!r}; allowed: {', '.join(map(repr, KV_CACHE_DTYPES))}"
            )
        if self.kv_reservation not in ("max_model_len", "exact"):
            raise LabkitError(f"kv_reservation={self.kv_reservation!r}; allowed: 'max_model_len', 'exact'")
        if not self.paged and self.enable_prefix_caching:
            raise LabkitError("enable_prefix_caching=True needs paged=True (contiguous KV shares no blocks)")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "decode_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LabkitError(f"{name}={value!r} must be a positive integer")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise LabkitError(f"num_blocks={self.num_blocks!r} must be a positive integer or None")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise LabkitError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                              f"max_model_len={self.max_model_len} without chunked prefill")
        if self.num_blocks is None:
            self.num_blocks = self.max_num_seqs * -(-self.max_model_len // self.block_size)
        if self.num_blocks * self.block_size < self.max_model_len:
            raise LabkitError(f"num_blocks={self.num_blocks} x block_size={self.block_size} cannot hold one "
                              f"sequence of max_model_len={self.max_model_len}")

    def speculative(self):
        """The parsed ``speculative_config`` (a :class:`labkit.serve.speculative.SpeculativeConfig`), or None."""
        from labkit.serve.speculative import SpeculativeConfig

        spec = self.speculative_config
        if spec is None:
            return None
        if isinstance(spec, str) and spec.lstrip().startswith("{"):  # JSON text, as the command line gives it
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise LabkitError(f"speculative_config={spec!r} is not JSON ({exc})") from None
        if not isinstance(spec, dict):
            raise LabkitError(f"speculative_config={spec!r} must be a dict such as "
                              "{'method': 'ngram', 'num_speculative_tokens': 4}")
        return SpeculativeConfig.from_dict(spec)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """The config from keyword arguments, each an ``EngineConfig`` field (as nano-vllm filters its
        ``**kwargs`` by ``fields(Config)``); an unknown name is an error that lists the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise LabkitError(f"{', '.join(unknown)}: not engine settings; allowed: {', '.join(allowed)}")
        return cls(**kwargs)


def cli_options() -> list[tuple[str, type | None, Any, str]]:
    """Each field as a command-line option: (``--flag-name``, its type or None for a switch, default, help)."""
    out = []
    for f in fields(EngineConfig):
        default = None if f.default is MISSING else f.default
        kind = bool if isinstance(default, bool) else (str if isinstance(default, str) else int)
        if f.name == "speculative_config":
            kind = str  # JSON text, as vLLM's --speculative-config '{"method": "ngram", ...}'
        out.append((f"--{f.name.replace('_', '-')}", None if kind is bool else kind, default,
                    f"engine: {f.name} (default {default})"))
    return out

