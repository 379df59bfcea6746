"""Gradescope's autograder, built from the kit: ``labkit export-gradescope --lesson 01 --out autograder.zip``.

Gradescope (its "Autograder Specifications" page) unzips the upload into ``/autograder/source``, runs ``setup.sh``
from its root once as root while it builds the image (Ubuntu, with ``python3`` and ``pip``), copies
``run_autograder`` to ``/autograder/run_autograder`` and, for every submission, puts the learner's files in
``/autograder/submission``, runs ``run_autograder`` from ``/autograder`` and uploads
``/autograder/results/results.json``. Here ``setup.sh`` installs the kit's wheel (shipped in the zip) with the
grading extras and fetches the offline models; ``run_autograder`` calls :func:`run`, which grades the submitted
notebook exactly as ``labkit grade`` does (its own kernel, quick mode, limits, confinement) and writes the results.
"""

from __future__ import annotations

import argparse
import json
import stat
import tempfile
import zipfile
from pathlib import Path

from labkit import LabkitError, atomic, exercises

WHEEL_GLOB = "labkit_inference-*.whl"

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, while it builds the autograder image (Ubuntu with python3 and pip).
# LABKIT_PYTHON and LABKIT_PIP_ARGS let a test rehearse it in a fresh environment elsewhere.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${LABKIT_PYTHON:-python3}"
# torch's CPU wheels (Gradescope's containers have no GPU; a plain `torch` would pull the multi-GB CUDA build)
"$PYTHON" -m pip install ${LABKIT_PIP_ARGS-"--extra-index-url https://download.pytorch.org/whl/cpu"} \\
    "$(ls "$HERE"/WHEEL_GLOB | head -n 1)[grade]"
"$PYTHON" -c "from labkit.cli import main; raise SystemExit(main(['fetch']))"
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission, from /autograder; it writes /autograder/results/results.json.
set -euo pipefail
"${LABKIT_PYTHON:-python3}" -m labkit.grading.gradescope "${AUTOGRADER_ROOT:-/autograder}" --lesson LESSON
"""


def build(lesson: str, out: str | Path, wheel: str | Path | None = None) -> Path:
    """Write the autograder zip for ``lesson`` ("01", ...): ``setup.sh`` and ``run_autograder`` at its root (as
    Gradescope requires) and the kit's wheel. ``wheel``: default the newest ``dist/labkit_inference-*.whl``."""
    exercises.of_lesson(lesson)
    if wheel is None:
        found = sorted(Path("dist").glob(WHEEL_GLOB), key=lambda p: p.stat().st_mtime)
        if not found:
            raise LabkitError("wheel: no dist/labkit_inference-*.whl here; run `make dist` first or pass --wheel")
        wheel = found[-1]
    wheel = Path(wheel)
    if not (wheel.is_file() and wheel.match(WHEEL_GLOB)):
        raise LabkitError(f"wheel={str(wheel)!r} is not a labkit_inference-*.whl file")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in (("setup.sh", SETUP_SH.replace("WHEEL_GLOB", WHEEL_GLOB)),
                               ("run_autograder", RUN_AUTOGRADER.replace("LESSON", lesson))):
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFREG | 0o755) << 16  # executable once unzipped
                z.writestr(info, text)
            z.write(wheel, wheel.name)
    return out


def run(root: str | Path, lesson: str) -> dict:
    """Grade the notebook in ``root/submission`` and write ``root/results/results.json``; returns the results."""
    from labkit.grading import check_gradescope, grade, gradescope_results

    root = Path(root)
    notebooks = sorted((root / "submission").glob("**/*.ipynb"))
    if not notebooks:
        results = {"score": 0.0, "output": "no .ipynb file in the submission: upload the lesson's notebook",
                   "visibility": "visible", "tests": []}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            row = grade(notebooks[:1], Path(tmp) / "grades", lesson=lesson, progress=False, jobs=1)[0]
        results = gradescope_results(row)
        if len(notebooks) > 1:
            results["output"] += f"\n(graded {notebooks[0].name}; {len(notebooks) - 1} other notebook(s) ignored)"
    check_gradescope(results)
    (root / "results").mkdir(parents=True, exist_ok=True)
    atomic.write_text(root / "results" / "results.json", json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m labkit.grading.gradescope")
    parser.add_argument("root", help="Gradescope's /autograder")
    parser.add_argument("--lesson", required=True)
    args = parser.parse_args()
    run(args.root, args.lesson)
