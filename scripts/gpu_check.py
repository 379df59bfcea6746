"""The kit's one-command GPU check (``make gpu-check``): ``-m gpu`` tests, then every experiment's quick run on
the GPU, records under ``results/reference/<gpu-name>/``.

The GPU machines this project is lent cannot download the real SmolLM2 weights (only 64 MiB of the tree
travels), so experiments use ``smollm2-135m-random`` — SmolLM2's exact shape, seeded random weights — and every
record says so: its speeds and memory are real, its perplexities and generated text are meaningless.
Budget: under 8 minutes on one H100-class GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gpu_slug() -> str:
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def install_carried_wheels() -> None:
    """The GPU machine cannot reach PyPI: install what ``make gpu-wheels`` put in ``wheels/``, best effort."""
    wheels = ROOT / "wheels"
    if not wheels.is_dir():
        print("no wheels/ folder: tests needing hypothesis/fastapi/bitsandbytes skip or fail to import", flush=True)
        return
    names = sorted({w.name.split("-")[0].replace("_", "-") for w in wheels.glob("*.whl")})
    for name in names:
        rc = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                              name], cwd=ROOT)
        print(f"install {name}: {'ok' if rc == 0 else f'exit {rc}'}", flush=True)


def run_tests(out: Path, timeout_s: int) -> int:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
           "--continue-on-collection-errors",
           f"--junitxml={out / 'gpu-tests.xml'}"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, timeout=timeout_s)


def run_experiments(out: Path, names: list[str], model: str) -> dict[str, str]:
    from labkit import experiments

    status = {}
    for name in names:
        mod = experiments.get(name)
        cfg = mod.Config.quick()
        for field in ("model", "llm"):
            if hasattr(cfg, field) and "smollm2" in str(getattr(cfg, field)):
                setattr(cfg, field, model)
        t0 = time.perf_counter()
        try:
            rec = mod.run(cfg, progress=False)
        except Exception as exc:  # noqa: BLE001 - report every experiment, keep going
            status[name] = f"FAILED: {type(exc).__name__}: {exc}"
            print(f"{name}: {status[name]}", flush=True)
            continue
        rec.config.update(quick=True, wall_s=round(time.perf_counter() - t0, 1), gpu_check=True,
                          weights_note=("random weights of SmolLM2's shape: speeds and memory are real; perplexity, "
                                        "accuracy and generated text are meaningless" if model.endswith("random")
                                        else "real weights"))
        path = rec.save(out)
        status[name] = f"wrote {path} ({rec.config['wall_s']} s)"
        print(f"{name}: {status[name]}", flush=True)
    return status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="default: results/reference/<gpu-name>")
    p.add_argument("--experiments", nargs="*", default=None, help="default: every experiment")
    p.add_argument("--model", default="smollm2-135m-random")
    p.add_argument("--test-timeout", type=int, default=240)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch; run it on a GPU machine", file=sys.stderr)
        return 2
    os.environ.setdefault("LABKIT_CACHE", str(ROOT / ".cache" / "labkit"))
    out = Path(args.out or ROOT / "results" / "reference" / gpu_slug())
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {torch.cuda.get_device_name(0)} -> {out}", flush=True)
    install_carried_wheels()
    rc = run_tests(out, args.test_timeout)
    from labkit import experiments

    names = args.experiments or [n for n in experiments.available() if n != "baseline"] + ["baseline"]
    status = run_experiments(out, names, args.model)
    failed = [n for n, s in status.items() if s.startswith("FAILED")]
    print(f"gpu tests: {'passed' if rc == 0 else f'exit {rc}'}; experiments failed: {failed or 'none'}")
    return 1 if rc not in (0, 5) or failed else 0


if __name__ == "__main__":
    sys.exit(main())
