"""The step breakdown: every phase and operator group accounted for, on the same steps, with clear errors."""

import time

import pytest
import torch

from labkit import LabkitError
from labkit.measure import MATMUL
from labkit.serve import LLM, SamplingParams
from labkit.serve.outputs import STEP_PHASES
from labkit.serve.profile import GATHER, GROUPS, step_breakdown
from tests.conftest import tiny_llama

MODEL = tiny_llama(seed=3)
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def prompts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (n,), generator=g)]


def test_phase_timers_cover_each_step_and_nothing_twice():
    llm = LLM(MODEL, None, max_model_len=128)
    t0 = time.perf_counter()
    llm.generate(prompts(), PARAMS, use_tqdm=False)
    wall = time.perf_counter() - t0
    phases = llm.stats.phase_s
    assert tuple(phases) == STEP_PHASES
    assert all(v >= 0 for v in phases.values())
    assert phases["forward"] > 0 and phases["sample"] > 0 and phases["propose"] == 0  # no speculation here
    assert sum(phases.values()) <= wall  # disjoint parts of the run, so never more than it
    per_step = llm.stats.phase_ms_per_step()
    assert per_step["forward"] == pytest.approx(1e3 * phases["forward"] / llm.stats.steps)


def test_reset_stats_clears_the_timers():
    llm = LLM(MODEL, None, max_model_len=128)
    llm.generate(prompts(2), PARAMS, use_tqdm=False)
    llm.reset_stats()
    assert set(llm.stats.phase_s.values()) == {0.0}


def test_speculation_is_timed_as_propose():
    llm = LLM(MODEL, None, max_model_len=128, speculative_config={"method": "draft_model", "model": MODEL,
                                                                   "num_speculative_tokens": 2})
    llm.generate(prompts(2), PARAMS, use_tqdm=False)
    assert llm.stats.phase_s["propose"] > 0  # the draft model's forward passes


def test_breakdown_profiles_the_same_steps_it_timed():
    llm = LLM(MODEL, None, max_model_len=128)
    ps = prompts()
    reference = [o.token_ids for o in llm.generate(ps, PARAMS, use_tqdm=False)]
    bd = step_breakdown(llm, ps, PARAMS, steps=3)
    assert tuple(bd["phases"]) == STEP_PHASES
    assert tuple(bd["ops"]) == GROUPS
    assert bd["window"]["steps"] == 3
    assert bd["ops"][MATMUL] > 0 and bd["ops"][GATHER] > 0  # decodes gather their blocks on the CPU
    assert all(v >= 0 for v in bd["ops"].values())
    assert not llm.engine.has_unfinished() and llm.engine.bm.num_used == 0  # both runs served to the end
    assert [o.token_ids for o in llm.generate(ps, PARAMS, use_tqdm=False)] == reference


def test_bad_window_is_a_clear_error():
    llm = LLM(MODEL, None, max_model_len=128)
    with pytest.raises(LabkitError, match="steps=0"):
        step_breakdown(llm, prompts(1), PARAMS, steps=0)
    with pytest.raises(LabkitError, match="prompts"):
        step_breakdown(llm, [], PARAMS)


def test_figure_draws_one_bar_per_measured_part():
    from labkit.serve.figures import step_breakdown_figure

    bd = {"phases": {k: float(i) for i, k in enumerate(STEP_PHASES)}, "ops": {k: 1.0 for k in GROUPS}}
    fig = step_breakdown_figure(bd)
    assert len(fig.axes[0].patches) == len(STEP_PHASES) - 1 + len(GROUPS)  # a zero-millisecond part draws nothing
