"""A request's tokens and its place in the paged KV cache."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Sequence:
    """Prompt + generated token ids, the block table mapping its logical blocks to physical ones, and how many
    tokens already have KV in the cache (``num_computed_tokens``).

    ``max_tokens`` (the request's output limit) lets a non-paged engine reserve exactly what the request can
    need; ``block_hashes`` caches the prefix-cache hash of each full block, computed once.
    """

    token_ids: list[int]
    block_size: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = -1
    max_tokens: int | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # tokens whose KV came from the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)
    status: Status = Status.WAITING

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
