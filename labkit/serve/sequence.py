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
    tokens already have KV in the cache (``num_computed_tokens``)."""

    token_ids: list[int]
    block_size: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = -1
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    status: Status = Status.WAITING

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold KV for every token so far."""
        return -(-len(self.token_ids) // self.block_size)

    @property
    def num_full_blocks(self) -> int:
        return len(self.token_ids) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
