"""Importing or calling the kit leaves the process as it found it: umask, matplotlib's backend, logging filters,
the global RNG, and cached data handed out as views."""

import logging
import subprocess
import sys

import torch


def test_importing_every_module_changes_no_process_state():
    code = """
import logging, os, matplotlib
before = (os.umask(0o022), matplotlib.get_backend(), {n: list(logging.getLogger(n).filters) for n in (
    "transformers.generation.utils", "transformers.generation.configuration_utils")})
os.umask(before[0])
import labkit.results, labkit.viz.plots, labkit.viz.widgets, labkit.serve.baselines, labkit.zoo
after_umask = os.umask(0o022); os.umask(after_umask)
after = (after_umask, matplotlib.get_backend(), {n: list(logging.getLogger(n).filters) for n in before[2]})
assert before == after, (before, after)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_train_restores_the_callers_random_state():
    from labkit.train import train

    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, (x, y), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), epochs=2, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_batches_are_copies_not_views_of_the_cache(tokenizer):
    from labkit import data

    a = data.calibration_batches(tokenizer, n=2, seq_len=8)
    a.zero_()
    assert data.calibration_batches(tokenizer, n=2, seq_len=8).abs().sum() > 0


def test_the_eos_filter_is_only_on_while_the_kit_generates():
    from labkit.serve.baselines import _DropEosWarning

    log = logging.getLogger("transformers.generation.utils")
    with _DropEosWarning():
        assert any(isinstance(f, _DropEosWarning) for f in log.filters)
    assert not any(isinstance(f, _DropEosWarning) for f in log.filters)
