"""The kit's GPU check (``make gpu-check``), sized for the GPU machine this project is lent.

That machine takes a 64 MiB tree, runs one command for at most 10 minutes, gives back at most 8 files from
``$OUT`` no more than two folders deep, and has 15 device-minutes a session, start-up included. So the check is
split into parts of about 5 minutes each (one command runs as many as fit its 540-s budget); each part runs its
steps (the ``-m gpu`` tests, then one experiment a
step) in a subprocess of its own with a timeout, catches a failure or a timeout and goes on, prints one summary
line a step, and writes everything it made as ONE tarball, ``OUT/gpu-check-<part>.tar.gz`` (records, logs, the
tests' JUnit XML, ``summary.json``), with ``OUT/gpu-check-<part>.txt`` beside it.

Models: the real SmolLM2 and MiniLM weights cannot travel (over 64 MiB), so every model field is swapped for its
twin of the same shape with seeded random weights (``labkit.zoo.RANDOM_TWINS``); every record says so: its speeds
and memory are real, its perplexities, accuracies of the LLM and cosines are meaningless.

``--rehearse`` runs the same parts on the CPU at the experiments' smallest sizes with the same random models (the LLM
with 2 of its 30 layers, recorded in each record) and
writes the same tarball: CI runs it, so a session that is lent a GPU only runs the prepared command::

    python3 scripts/gpu_check.py --part all --out "$OUT"          # on the lent GPU (two calls: see PARTS)
    python3 scripts/gpu_check.py --rehearse --part all --out /tmp/x  # anywhere, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT))  # the kit in this tree, wherever the script is started from

from labkit import experiments  # noqa: E402

# Parts of the check, each about 5 minutes on one H100: SLOTS names each experiment's part and expected seconds (only
# this script knows about lent machines); a new experiment joins the last part until it gets a slot. How the seconds
# were estimated: the CPU quick runs' wall times (records under labkit/reference/cpu-epyc-2core: baseline 16 s,
# quantization 240,
# serving 619, pruning 217, distillation 158, capstone 101, onnx 39, tensorrt 22 on 2 cores) divided by what a GPU
# buys each: decode-bound steps (serving, quantization's decode timing) are launch-bound at batch 1 on a 135M model,
# so about 4x; training and prefill-bound steps (pruning's KD recovery, distillation, capstone) about 5x; plus about
# 15 s a step to start Python, torch and CUDA, and for quantization the two variants a GPU adds (fp16,
# bitsandbytes). The tests: about 6 CUDA tests and their collection. Each step's timeout is twice its estimate.
SLOTS: dict[str, tuple[str, int]] = {  # experiment -> (its part, seconds expected on one H100)
    "baseline": ("tests-quant", 25),
    "capstone": ("serve", 45),
    "distillation": ("compress", 50),
    "onnx": ("compress", 40),
    "pruning": ("compress", 60),
    "quantization": ("tests-quant", 120),
    "serving": ("serve", 170),
    "speculative": ("serve", 40),
    "scale": ("compress", 90),  # replicas start as processes: one engine, then three, then a router per policy
    "tensorrt": ("compress", 60),
    "engines": ("tests-quant", 40),  # the kit's four decode rows on the GPU; llama.cpp and vLLM CPU are said, not run
}
NEW_EXPERIMENT_SLOT = ("compress", 60)  # an experiment this table does not name yet: the last part, a guess
PART_ORDER = ("tests-quant", "serve", "compress")  # the -m gpu tests run first, in the first part
ESTIMATE_S: dict[str, int] = {"gpu-tests": 90}
PARTS: dict[str, list[str]] = {PART_ORDER[0]: ["gpu-tests"]}
for _name in experiments.available():
    _part, ESTIMATE_S[_name] = SLOTS.get(_name, NEW_EXPERIMENT_SLOT)
    PARTS.setdefault(_part, []).append(_name)
PARTS = {p: PARTS[p] for p in sorted(PARTS, key=lambda p: (PART_ORDER + (p,)).index(p))}
BUDGET_S = 540  # one device command may run 600 s: steps that would not finish inside this are not started
REHEARSAL_LAYERS = 2  # the rehearsal's random SmolLM2 keeps every shape but the depth: the same code, 1/10 the work


WEIGHTS_NOTE = ("random weights of SmolLM2's and MiniLM's exact shapes (labkit.zoo.RANDOM_TWINS): speeds and memory "
                "are real; the LLM's perplexity, accuracy of generated text and encoder cosines are meaningless")


class CheckError(ValueError):
    """A bad argument to the check: the message names the value and what is allowed."""


def parse_parts(names: list[str]) -> list[str]:
    """The parts asked for, in order; ``all`` means every part."""
    out: list[str] = []
    for n in names:
        if n == "all":
            out += [p for p in PARTS if p not in out]
        elif n in PARTS:
            out += [n] if n not in out else []
        else:
            raise CheckError(f"--part {n!r} is not a part of the GPU check; allowed: {', '.join([*PARTS, 'all'])}")
    return out


def gpu_slug() -> str:
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def hardware_label(rehearse: bool) -> str:
    from labkit import env

    if rehearse:
        return f"CPU rehearsal on {env.cpu_name()} ({os.cpu_count()} cores), not a GPU"
    import torch

    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return f"{torch.cuda.get_device_name(0)} (compute capability {capability})"


def needs(step: str) -> str | None:
    """Why ``step`` does not need this GPU machine, or None when it does (run only what needs a GPU there)."""
    from labkit import env

    if step == "onnx" and "CUDAExecutionProvider" not in env.ort_providers():
        return ("onnxruntime here has no CUDA provider, so this experiment would measure only its CPU rows, which "
                "`make report` measures on every machine")
    if step == "tensorrt" and env.lib_version("tensorrt") is None:
        return "TensorRT is not installed here (too large to carry): the engine rows cannot run"
    return None


def swap_to_random(cfg) -> dict[str, str]:
    """Every model field of an experiment config swapped for its random twin; returns what was swapped."""
    from dataclasses import fields

    from labkit.zoo import RANDOM_TWINS

    swapped = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and value in RANDOM_TWINS:
            setattr(cfg, f.name, RANDOM_TWINS[value])
            swapped[f.name] = RANDOM_TWINS[value]
    return swapped


def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests (collecting only them keeps the step short)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


# ------------------------------------------------------------------------------------------------ one step

def run_step(step: str, out: Path, rehearse: bool, part: str) -> int:
    """Run one step in this process (the parent runs each step in a subprocess of its own)."""
    if step == "gpu-tests":
        cmd = [sys.executable, "-m", "pytest", *gpu_test_files(), "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "-rs", f"--junitxml={out / 'gpu-tests.xml'}"]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        return 0 if rc in (0, 5) else rc  # 5: nothing collected (every gpu test deselected)
    from labkit import experiments

    mod = experiments.get(step)
    cfg = mod.Config.smallest() if rehearse else mod.Config.quick()
    swapped = swap_to_random(cfg)
    cfg.device = "cpu" if rehearse else "cuda"
    t0 = time.perf_counter()
    rec = mod.run(cfg, progress=False)
    from labkit.zoo import random_llm_layers

    rec.config.update(quick=not rehearse, wall_s=round(time.perf_counter() - t0, 1), weights_note=WEIGHTS_NOTE,
                      gpu_check={"part": part, "hardware": hardware_label(rehearse), "rehearsal": rehearse,
                                 "sizes": "smallest" if rehearse else "quick", "random_weights": swapped,
                                 "random_llm_layers": random_llm_layers()})
    print(f"wrote {rec.save(out)}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ one part

def run_part(part: str, out: Path, rehearse: bool, deadline: float) -> list[dict]:
    """Every step of ``part`` in its own subprocess; one summary line a step; one tarball in ``out``. On a GPU a
    step starts only if its estimate fits before ``deadline`` (a ``time.perf_counter()`` value)."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{part}-") as tmp:
        work = Path(tmp) / f"gpu-check-{part}"
        (work / "logs").mkdir(parents=True)
        for step in PARTS[part]:
            row = {"part": part, "step": step}
            why = None if rehearse else needs(step)
            left = deadline - time.perf_counter()
            timeout = 600 if rehearse else min(2 * ESTIMATE_S[step], max(left, 30))
            if why:
                row.update(status="skipped", reason=why)
            elif not rehearse and left < ESTIMATE_S[step]:
                row.update(
                    status="skipped",
                    reason=f"not started: {left:.0f} s left of this command's budget, the "
                    f"step needs about {ESTIMATE_S[step]} s; run its part in a new call",
                )
            else:
                row.update(_spawn(step, work, rehearse, part, timeout))

            rows.append(row)
            print(summary_line(row), flush=True)
        (work / "summary.json").write_text(json.dumps({"part": part, "hardware": hardware_label(rehearse),
                                                       "rehearsal": rehearse, "steps": rows}, indent=2))
        text = "\n".join(summary_line(r) for r in rows) + "\n"
        (work / "summary.txt").write_text(text)
        _atomic_write(out / f"gpu-check-{part}.txt", text.encode())
        tmp_tar = out / f".gpu-check-{part}.tar.gz.tmp"
        with tarfile.open(tmp_tar, "w:gz") as tar:
            tar.add(work, arcname=work.name)
        os.replace(tmp_tar, out / f"gpu-check-{part}.tar.gz")
    return rows


def _spawn(step: str, work: Path, rehearse: bool, part: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--part", part, "--out", str(work)]
    cmd += ["--rehearse"] if rehearse else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONUNBUFFERED": "1",
    }
    if rehearse:  # the CPU rehearsal: SmolLM2's shape but 2 of its 30 layers (recorded); the GPU runs all 30
        env.setdefault("LABKIT_RANDOM_LAYERS", str(REHEARSAL_LAYERS))
    else:
        env.pop("LABKIT_RANDOM_LAYERS", None)
    log = work / "logs" / f"{step}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                    "reason": f"killed after {timeout:.0f} s (estimate {ESTIMATE_S[step]} s); see logs/{step}.log"}
    seconds = round(time.perf_counter() - t0, 1)
    if rc == 0:
        return {"status": "ok", "seconds": seconds}
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["(no output)"]
    return {"status": "failed", "seconds": seconds, "reason": f"exit {rc}: {tail[0][:300]}"}


def summary_line(row: dict) -> str:
    took = f" in {row['seconds']} s" if "seconds" in row else ""
    why = f": {row['reason']}" if row.get("reason") else ""
    return f"gpu-check {row['part']}/{row['step']}: {row['status'].upper()}{took}{why}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", nargs="+", default=["all"], help=f"one or more of {', '.join(PARTS)}, or all")
    p.add_argument("--out", default=None, help="where the tarballs go (default: results/gpu-check)")
    p.add_argument("--rehearse", action="store_true", help="the same parts on the CPU, smallest sizes")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds this command may take on the GPU")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: one step, in a subprocess
    args = p.parse_args(argv)
    os.environ.setdefault("LABKIT_CACHE", str(ROOT / ".cache" / "labkit"))
    out = Path(args.out or ROOT / "results" / "gpu-check")
    if args.step:
        return run_step(args.step, out, args.rehearse, args.part[0])
    try:
        parts = parse_parts(args.part)
        from labkit.results import ensure_writable

        ensure_writable(out)
    except ValueError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch; run it on a GPU machine, or use --rehearse to run the same "
              "parts on this CPU", file=sys.stderr)
        return 2
    print(f"gpu-check {'rehearsal' if args.rehearse else 'on ' + hardware_label(False)}: parts {parts} -> {out}",
          flush=True)
    deadline = time.perf_counter() + args.budget
    rows = [row for part in parts for row in run_part(part, out, args.rehearse, deadline)]

    bad = [f"{r['part']}/{r['step']}" for r in rows if r["status"] in ("failed", "timeout")]
    print(f"gpu-check: {len(rows) - len(bad)} of {len(rows)} steps ok or skipped; failed: {bad or 'none'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
