"""Result records: one JSON file per experiment run, written atomically.

A record is ``{"experiment", "variants": [{"name", "model", <metrics>}], "config", "env", "created_at",
"labkit_version"}``. Metric names are shared across experiments (see DESIGN.md in the repository): ``params``,
``weight_bytes``, ``perplexity``, ``accuracy``, ``cosine_to_reference``, ``latency_ms_median``,
``latency_ms_iqr``, ``tokens_per_s``, ``output_tokens_per_s``, ``kv_waste_pct``, ``ttft_ms_p50``, ...
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from labkit import LabkitError, __version__


@dataclass
class Record:
    experiment: str
    variants: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    labkit_version: str = __version__

    def add(self, name: str, **metrics: Any) -> dict[str, Any]:
        """Append a variant ``{"name": name, **metrics}`` and return it."""
        if any(v["name"] == name and v.get("model") == metrics.get("model") for v in self.variants):
            raise LabkitError(f"variant name={name!r} (model {metrics.get('model')!r}) is already in the record")
        row = {"name": name, **metrics}
        self.variants.append(row)
        return row

    def variant(self, name: str, model: str | None = None) -> dict[str, Any]:
        for v in self.variants:
            if v["name"] == name and (model is None or v.get("model") == model):
                return v
        names = sorted({v["name"] for v in self.variants})
        raise LabkitError(f"no variant name={name!r} (model={model!r}); variants: {', '.join(names)}")

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "variants": self.variants, "config": self.config,
                "env": self.env, "created_at": self.created_at, "labkit_version": self.labkit_version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        missing = [k for k in ("experiment", "variants") if k not in d]
        if missing:
            raise LabkitError(f"not a labkit record: missing keys {missing}")
        return cls(experiment=d["experiment"], variants=list(d["variants"]), config=d.get("config", {}),
                   env=d.get("env", {}), created_at=d.get("created_at", ""),
                   labkit_version=d.get("labkit_version", ""))

    def to_frame(self) -> pd.DataFrame:
        """One row per variant, columns ``model``, ``name`` then the metrics."""
        df = pd.DataFrame(self.variants)
        front = [c for c in ("model", "name") if c in df.columns]
        return df[front + [c for c in df.columns if c not in front]]

    def save(self, out_dir: str | Path = "results") -> Path:
        """Write ``out_dir/<experiment>.json`` atomically (temp file in the same directory, then rename)."""
        out = ensure_writable(out_dir)
        path = out / f"{self.experiment}.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")
        return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same directory and a rename: never half-written."""
    from labkit import atomic

    return atomic.write_text(path, text)


def _jsonable(obj: Any) -> Any:
    """JSON for the few non-JSON values records hold: scalars of numpy/torch, paths, dtypes and devices. Anything
    else is an error naming its type, never a silent ``str()`` that no one can read back."""
    import torch

    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"a record cannot hold a {type(obj).__name__} ({obj!r:.80}): store numbers, strings, lists or "
                    "dicts")


def load(path: str | Path) -> Record:
    path = Path(path)
    if not path.exists():
        raise LabkitError(f"no record at {path}")
    return Record.from_dict(json.loads(path.read_text()))


def load_all(results_dir: str | Path = "results") -> list[Record]:
    """Every record directly under ``results_dir`` (sorted by experiment name)."""
    d = Path(results_dir)
    return sorted((load(p) for p in d.glob("*.json")), key=lambda r: r.experiment) if d.is_dir() else []


def reference_dirs() -> list[Path]:
    """Where reference records live: ``$LABKIT_REFERENCE``, then ``labkit/reference`` inside the package (so an
    installed wheel, on Colab say, has them too), then a ``results/reference`` of your own in the working directory
    or its parent (a notebook runs in ``notebooks/``)."""
    import importlib.resources

    packaged = Path(str(importlib.resources.files("labkit").joinpath("reference")))
    candidates = [os.environ.get("LABKIT_REFERENCE"), packaged,
                  Path.cwd() / "results" / "reference", Path.cwd().parent / "results" / "reference"]
    seen, out = set(), []
    for c in candidates:
        if c and Path(c).is_dir() and Path(c).resolve() not in seen:
            seen.add(Path(c).resolve())
            out.append(Path(c))
    return out


def load_reference(experiment: str, hardware: str | None = None) -> tuple[Record, str] | None:
    """The reference record of ``experiment`` and the folder (hardware) it came from, or None where none is
    here (e.g. a Colab runtime with only the wheel). ``hardware`` picks a folder such as ``"cpu-epyc-2core"``;
    by default the newest record wins."""
    found = []
    for d in reference_dirs():
        for path in d.glob(f"*/{experiment}.json"):
            if hardware is None or path.parent.name == hardware:
                found.append(path)
    if not found:
        return None
    rec = [load(p) for p in found]
    best = max(range(len(rec)), key=lambda i: rec[i].created_at or "")
    return rec[best], found[best].parent.name


def ensure_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and prove it is writable, before any work starts."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".labkit-write-check"):
            pass
    except OSError as exc:
        raise LabkitError(f"output directory {str(out)!r} is not writable ({exc.strerror or exc})") from None
    return out
