"""What the engine hands back: one :class:`RequestOutput` per request and the engine's :class:`EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

from labkit import LabkitError


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


# the parts of LLMEngine.step(), in order: guesses (speculative decoding), the scheduler's decision, the flat batch
# and its masks, the model's forward pass, sampling or verification (one device-to-host copy), and the
# bookkeeping after it (appending tokens, finishing requests, freeing blocks, counting waste)
STEP_PHASES = ("propose", "schedule", "prepare", "forward", "sample", "update")


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    peak_blocks: int = 0
    max_running: int = 0  # the most requests in one step's batch
    prefix_hit_blocks: int = 0
    # KV telemetry, counted only when the engine records (LLM(..., record_history=True)): it walks every block
    # table each step, which a served step should not pay for
    recorded: bool = False
    waste_slots: int = 0  # summed over steps: reserved slots not holding a token
    reserved_slots: int = 0
    history: list[dict] = field(default_factory=list)  # per-step snapshots
    # The vLLM paper's three memory wastes (Kwon et al., SOSP 2023, section 3), in token slots summed over steps:
    used_slot_steps: int = 0  # holding a token's KV
    reserved_slot_steps: int = 0  # held now for tokens the request will produce later
    internal_slot_steps: int = 0  # internal fragmentation: held for tokens the request never produces
    external_slot_steps: int = 0  # external fragmentation: free, but in holes too small for the waiting request
    pool_slot_steps: int = 0  # the whole pool
    open_traces: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # seq -> (held, filled) a step
    spec_proposed: int = 0  # speculative decoding: guessed tokens verified
    spec_accepted: int = 0  # ... and kept
    # wall seconds each part of a step took, summed over steps (STEP_PHASES; on a GPU the forward's kernels run
    # asynchronously, so their time shows up in "sample", whose device-to-host copy waits for them)
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))

    @property
    def acceptance_rate(self) -> float:
        """Share of guessed tokens the target kept (speculative decoding; 0 without it)."""
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0

    def close_trace(self, seq_id: int) -> None:
        """Once a request ends, its length is known: split each step's held slots into used / reserved /
        internal fragmentation."""
        trace = self.open_traces.pop(seq_id, [])
        final = max((filled for _, filled in trace), default=0)
        for held, filled in trace:
            self.used_slot_steps += filled
            self.reserved_slot_steps += min(held, final) - filled
            self.internal_slot_steps += held - min(held, final)

    def waste_breakdown_pct(self) -> dict[str, float]:
        """Each kind of KV slot as a percentage of the pool, over the run's steps (the rest of the pool is free
        and usable). Call after every request has finished."""
        self._need_recording("waste_breakdown_pct()")
        total = self.pool_slot_steps or 1
        return {"used": 100.0 * self.used_slot_steps / total, "reserved": 100.0 * self.reserved_slot_steps / total,
                "internal_fragmentation": 100.0 * self.internal_slot_steps / total,
                "external_fragmentation": 100.0 * self.external_slot_steps / total}

    def phase_ms_per_step(self) -> dict[str, float]:
        """Milliseconds per step each phase took, averaged over the steps so far."""
        return {k: 1e3 * v / max(self.steps, 1) for k, v in self.phase_s.items()}

    @property
    def kv_waste_pct(self) -> float:
        """Reserved KV slots not holding a token, as a % of the reserved slots, over every step."""
        self._need_recording("kv_waste_pct")
        return 100.0 * self.waste_slots / self.reserved_slots if self.reserved_slots else 0.0

    def _need_recording(self, what: str) -> None:
        if not self.recorded and self.steps:
            raise LabkitError(f"{what} is counted only when the engine records: create the engine with "
                              "LLM(..., record_history=True) (it walks every block table each step)")
