"""Engine configuration: one dataclass, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

from labkit import LabkitError


@dataclass
class EngineConfig:
    """Knobs of the paged engine.

    ``num_blocks=None`` sizes the KV pool for ``max_num_seqs`` sequences of ``max_model_len`` tokens.
    ``paged=False`` switches paging off: each admitted sequence reserves KV for ``max_model_len`` tokens up
    front, as engines without paging must (the ``labkit-contiguous`` baseline).
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 1024
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    paged: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
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
