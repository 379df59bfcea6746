"""Recompute the derived fields of saved records — ``targets`` and, for the capstone, ``decisions`` — from their
unchanged measurements, after an experiment's TARGETS or the kit's quality rule changed.

    python tools/recheck_records.py labkit/reference/*/*.json results/*.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from labkit import experiments, results
from labkit.experiments import protocol


def recheck(path: Path) -> list[str]:
    """Rewrite ``path`` (atomically) with its targets (and decisions) recomputed; returns the keys that changed."""
    rec = results.load(path)
    mod = experiments.get(rec.experiment)
    before = dict(rec.config)
    if rec.experiment == "capstone":
        fields = mod.Config.__dataclass_fields__
        rec.config["decisions"] = mod.decisions(rec, mod.Config(**{k: v for k, v in rec.config.items()
                                                                   if k in fields and k != "device"}))
    rec.config["targets"] = protocol.check(rec, mod.TARGETS)
    rec.save(path.parent)
    return [k for k in ("targets", "decisions") if before.get(k) != rec.config.get(k)]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        changed = recheck(Path(arg))
        print(f"{arg}: {', '.join(changed) or 'unchanged'}")
