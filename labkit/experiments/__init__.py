"""One experiment per notebook: a ``Config`` dataclass (with ``quick()``) and ``run(config) -> Record``."""

from __future__ import annotations

import importlib
from types import ModuleType

from labkit import LabkitError

EXPERIMENTS: dict[str, str] = {
    "baseline": "labkit.experiments.baseline",
    "quantization": "labkit.experiments.quantization",
    "serving": "labkit.experiments.serving",
    "pruning": "labkit.experiments.pruning",
    "distillation": "labkit.experiments.distillation",
    "onnx": "labkit.experiments.onnx",
    "tensorrt": "labkit.experiments.tensorrt",
    "capstone": "labkit.experiments.capstone",
}


def available() -> list[str]:
    """Experiments whose module exists in this version of the kit."""
    return [n for n, mod in EXPERIMENTS.items() if importlib.util.find_spec(mod) is not None]


def get(name: str) -> ModuleType:
    if name not in available():
        raise LabkitError(f"unknown experiment {name!r}; known experiments: {', '.join(available())}")
    return importlib.import_module(EXPERIMENTS[name])
