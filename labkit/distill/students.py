"""Students built from a teacher: a narrower CNN, and a layer-dropped LM initialised from the teacher's layers
(DistilBERT kept every other layer of BERT), saved and reloaded with its new shape."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from labkit import LabkitError


def narrow_cnn(width: int = 16, num_classes: int = 10) -> nn.Module:
    """The digits CNN at a smaller width (the teacher's is 32): fewer channels, same shape of network."""
    from labkit.zoo import DigitsCNN

    if not isinstance(width, int) or width < 2 or width % 2:
        raise LabkitError(f"width={width!r} must be an even integer >= 2")
    return DigitsCNN(width=width, num_classes=num_classes)


def kept_layers(num_layers: int, keep_every: int = 2, keep: list[int] | None = None) -> list[int]:
    """Indices of the teacher layers a student keeps: every ``keep_every``-th (always including the last, whose
    output feeds the final norm), or an explicit list."""
    if keep is None:
        if not isinstance(keep_every, int) or keep_every < 1:
            raise LabkitError(f"keep_every={keep_every!r} must be a positive integer")
        keep = sorted(set(range(keep_every - 1, num_layers, keep_every)) | {num_layers - 1})
    if not keep:
        raise LabkitError("keep=[] keeps no layer: a student needs at least one")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise LabkitError(
            f"keep={keep}: layer {bad[0]} does not exist (the teacher has {num_layers}: 0..{num_layers - 1})"
        )
    return sorted(set(keep))


def layer_dropped_lm(teacher: nn.Module, keep_every: int = 2, keep: list[int] | None = None) -> nn.Module:
    """A causal LM with the teacher's embedding, final norm and head, and a subset of its decoder layers (copied,
    not shared), with ``config.num_hidden_layers`` updated so it saves and reloads as a normal model."""
    from transformers import AutoModelForCausalLM

    layers = teacher.model.layers
    idx = kept_layers(len(layers), keep_every, keep)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(idx)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in idx]
    student = AutoModelForCausalLM.from_config(config).to(dtype=teacher.dtype, device=teacher.device)
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for new, old in enumerate(idx):
        student.model.layers[new].load_state_dict(layers[old].state_dict())
    if not getattr(config, "tie_word_embeddings", False):
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    student.config.labkit_kept_layers = idx
    return student.eval()


def save_student(model: nn.Module, path: str | Path) -> Path:
    """Save a student (config with its new layer count + safetensors weights) to a directory, atomically: a
    failure part-way leaves the previous save as it was."""
    from labkit.atomic import atomic

    path = Path(path)
    with atomic(path, directory=True) as tmp:
        model.save_pretrained(tmp)
    return path


def load_student(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Reload a saved student with its own shape."""
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").exists():
        raise LabkitError(f"path={str(path)!r} holds no saved student (no config.json); save one with save_student")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
