"""What the engine hands back: one :class:`RequestOutput` per request and the engine's :class:`EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS) | "length" | "abort" | "error"
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    samples: list[RequestOutput] = field(default_factory=list)  # n > 1: every sample, this one first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    peak_blocks: int = 0
    prefix_hit_blocks: int = 0
    waste_slots: int = 0  # summed over steps: reserved slots not holding a token
    reserved_slots: int = 0
    history: list[dict] = field(default_factory=list)  # per-step snapshots when recording

    @property
    def kv_waste_pct(self) -> float:
        return 100.0 * self.waste_slots / self.reserved_slots if self.reserved_slots else 0.0
