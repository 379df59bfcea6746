"""Build a cohort of submissions of one shipped notebook, to time `labkit grade` on it (README, "Workshops").

    python tools/cohort.py OUT_DIR [--notebook notebooks/07_capstone.ipynb] [--learners 10]
    time labkit grade OUT_DIR --out /tmp/grades

Every other learner fills in notebook 07's ``choose`` (through ``labkit.select``, as a learner may); the rest hand
the stub back unchanged. Only notebook 07's exercise is filled in; for other notebooks every copy is the stub.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STUB = "def choose(rows, within, baseline):\n    raise NotImplementedError  # your code here\n"
FILLED = '''def choose(rows, within, baseline):
    from labkit import select
    tagged = [{**r, "model": "m"} for r in rows]
    return select.select(tagged, model="m", metric="accuracy", within=within, cost="weight_bytes",
                         baseline=baseline).variant["name"]
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--notebook", default="notebooks/07_capstone.ipynb")
    p.add_argument("--learners", type=int, default=10)
    args = p.parse_args()
    if args.learners < 1:
        raise SystemExit(f"--learners={args.learners} must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stored = Path(args.notebook).read_text(encoding="utf-8")
    for i in range(args.learners):
        nb = json.loads(stored)
        if i % 2 == 0:
            for cell in nb["cells"]:
                source = "".join(cell["source"])
                if STUB in source:
                    cell["source"] = source.replace(STUB, FILLED)
        (out / f"learner{i:02d}.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    print(f"wrote {args.learners} submissions of {args.notebook} to {out}")


if __name__ == "__main__":
    main()
