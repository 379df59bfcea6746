"""The GPU check, rehearsed on the CPU: the same parts, smallest sizes, random models, the same tarballs — so the
first lent GPU only has to run the prepared command. Checks what the lent machine's limits demand: at most 8 files
come back from $OUT, no more than two folders deep, a record per experiment, labelled with its hardware and as
random weights."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from labkit import experiments

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_parts_cover_every_experiment_once_and_fit_the_budget():
    gc = load_script()
    steps = [s for part in gc.PARTS.values() for s in part]
    assert sorted(s for s in steps if s != "gpu-tests") == sorted(experiments.available())
    assert len(steps) == len(set(steps))
    for part, names in gc.PARTS.items():  # about 5 minutes each on one H100, inside one 10-minute command
        assert sum(gc.ESTIMATE_S[n] for n in names) <= 330, part
    assert gc.BUDGET_S < 600
    assert gc.gpu_test_files() and all("mark.gpu" in (ROOT / f).read_text() for f in gc.gpu_test_files())


def test_every_model_field_is_swapped_for_its_random_twin():
    gc = load_script()
    from labkit import zoo

    for name in experiments.available():
        cfg = experiments.get(name).Config.quick()
        gc.swap_to_random(cfg)
        left = [f for f, v in vars(cfg).items() if isinstance(v, str) and v in zoo.RANDOM_TWINS]
        assert not left, f"{name}: {left} still name a model whose weights cannot travel"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--part", "everything", "--rehearse"],
            "--part 'everything' is not a part of the GPU check; allowed: tests-quant, serve, compress, all",
        ),
        (
            ["--part", "serve", "--rehearse", "--out", "/proc/labkit-no"],
            "output directory '/proc/labkit-no' is not writable",
        ),
    ],
)
def test_bad_arguments_get_a_clear_error(args, message):
    r = check(*args, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_without_a_gpu_the_real_check_refuses_and_names_the_rehearsal(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = check("--part", "serve", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "--rehearse" in r.stderr


@pytest.mark.slow
def test_rehearsal_writes_what_the_lent_machine_can_return(tmp_path):
    gc = load_script()
    out = tmp_path / "OUT"
    r = check("--rehearse", "--part", "all", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [s for part in gc.PARTS.values() for s in part]
    for part, names in gc.PARTS.items():  # one summary line a step
        for n in names:
            assert f"gpu-check {part}/{n}: OK" in r.stdout, (part, n, r.stdout[-2000:])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert sorted(p.name for p in files) == sorted(
        [f"gpu-check-{p}.tar.gz" for p in gc.PARTS] + [f"gpu-check-{p}.txt" for p in gc.PARTS])
    records = {}
    for part in gc.PARTS:
        with tarfile.open(out / f"gpu-check-{part}.tar.gz") as tar:
            names = tar.getnames()
            summary = json.load(tar.extractfile(f"gpu-check-{part}/summary.json"))
            assert summary["rehearsal"] and [s["step"] for s in summary["steps"]] == gc.PARTS[part]
            for m in tar.getmembers():
                if m.name.endswith(".json") and m.name.count("/") == 1 and not m.name.endswith("summary.json"):
                    records[Path(m.name).stem] = json.load(tar.extractfile(m))
            assert f"gpu-check-{part}/logs/{gc.PARTS[part][0]}.log" in names
    assert sorted(records) == sorted(experiments.available()) == sorted(s for s in steps if s != "gpu-tests")
    for name, rec in records.items():
        label = rec["config"]["gpu_check"]
        assert label["rehearsal"] is True and "CPU rehearsal" in label["hardware"], name
        assert "random weights" in rec["config"]["weights_note"], name
        assert all(v.endswith("-random") for v in label["random_weights"].values()), name
        assert label["random_llm_layers"] == gc.REHEARSAL_LAYERS, name
        assert rec["config"]["device"] == "cpu" and rec["variants"], name
    assert "bnb-nf4" in {v["name"] for v in records["quantization"]["variants"]}  # the real bitsandbytes path
