"""Where an engine step's time goes: the step's phases (wall-clock timers the engine keeps, ``EngineStats.phase_s``)
and, inside the forward pass, the operators (``torch.profiler``), grouped into what a serving engine spends on.

The operator groups say what could be made faster and by how much at most: if the model's matrix multiplies take a
share ``m`` of the step, removing *everything else* would speed the step up ``1 / m`` times, no more.
"""

from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile

from labkit import LabkitError
from labkit.measure import GATHER, OP_GROUPS, op_group
from labkit.measure import OUTSIDE_OPS as OUTSIDE
from labkit.serve.llm import LLM
from labkit.serve.outputs import STEP_PHASES
from labkit.serve.sampling import SamplingParams

__all__ = ["GATHER", "GROUPS", "OUTSIDE", "op_group", "step_breakdown"]
GROUPS = (*OP_GROUPS, OUTSIDE)  # the operator groups of labkit.measure, one grouping for every breakdown


def _step_times(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], hook=None) -> list[float]:
    """Serve the requests on ``llm``'s engine step by step; each step's wall seconds. ``hook(i)`` runs before step
    ``i`` (and once after the last, with the number of steps)."""
    engine = llm.engine
    for p, sp in zip(prompts, params):
        engine.add_request(list(p), sp)
    walls = []
    while engine.has_unfinished():
        if hook:
            hook(len(walls))
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    if hook:
        hook(len(walls))
    return walls


def step_breakdown(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   steps: int = 6) -> dict[str, dict[str, float]]:
    """Where a step's time goes, in milliseconds per engine step. Serves ``prompts`` twice on ``llm`` (warm it up
    first); the scheduler is deterministic, so step ``i`` of both runs runs the same batch.

    * ``"phases"``: the engine's phase timers (``EngineStats.phase_s``), over the whole first run;
    * ``"ops"``: operator groups of ``steps`` consecutive steps a third of the way in, from the second run under
      ``torch.profiler``. On the CPU they include that window's time outside any operator; on a GPU they are
      kernel times. The profiler slows small operators most, and turning its events into a table takes longer than
      the steps, hence the short window;
    * ``"window"``: the window's ms per step in the first run (``plain``) and under the profiler (``profiled``).
    """
    if steps < 1:
        raise LabkitError(f"steps={steps} must be at least 1")
    if not prompts:
        raise LabkitError("prompts is empty; give at least one request to profile")
    plist = params if isinstance(params, list) else [params] * len(prompts)
    llm.reset_stats()
    plain = _step_times(llm, prompts, plist)
    phases = llm.stats.phase_ms_per_step()
    first = len(plain) // 3
    window = range(first, min(first + steps, len(plain)))
    on_gpu = llm.engine.model.device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []))
    marks: dict[str, float] = {}

    def hook(i: int) -> None:
        if i == window.start:
            prof.start()
            marks["t0"] = time.perf_counter()
        elif i == window.stop:
            marks["t1"] = time.perf_counter()
            prof.stop()

    _step_times(llm, prompts, plist, hook)
    n = len(window)
    ops = dict.fromkeys(GROUPS, 0.0)
    for evt in prof.key_averages():
        ops[op_group(evt.key)] += (evt.self_device_time_total if on_gpu else evt.self_cpu_time_total) / 1e3 / n
    profiled = 1e3 * (marks["t1"] - marks["t0"]) / n
    if on_gpu:
        del ops[OUTSIDE]
    else:
        ops[OUTSIDE] = max(0.0, profiled - sum(ops.values()))
    return {"phases": {k: phases[k] for k in STEP_PHASES}, "ops": ops,
            "window": {"steps": n, "plain": 1e3 * sum(plain[i] for i in window) / n, "profiled": profiled}}
