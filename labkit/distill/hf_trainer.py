"""Token-level KD with the production trainer: transformers' ``Trainer``, its ``compute_loss`` overridden.

``Trainer`` already does what a course would otherwise rewrite (optimizer and schedule, gradient accumulation,
mixed precision, logging, checkpoints, devices); a KD loss is one method. The loss is the kit's own
(:func:`labkit.distill.losses.token_kd_loss` mixed with next-token loss, as ``labkit.distill.experiment``
trains its LM student), so the two routes can be checked against each other.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labkit import LabkitError
from labkit.distill.losses import token_kd_loss


def kd_lm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
               kd_weight: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """``kd_weight`` x forward token KL(teacher || student) + (1 - kd_weight) x next-token loss."""
    if not 0.0 <= kd_weight <= 1.0:
        raise LabkitError(f"kd_weight={kd_weight} must be in [0, 1]")
    ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    return kd_weight * token_kd_loss(student_logits, teacher_logits, temperature=temperature) + (1 - kd_weight) * ce


def kd_trainer(student: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, *, steps: int, batch_size: int = 2,
               lr: float = 3e-4, kd_weight: float = 0.5, temperature: float = 1.0, seed: int = 0,
               output_dir: str | None = None) -> Any:
    """A ``transformers.Trainer`` that distils ``teacher`` into ``student`` on ``train_ids [N, L]`` for
    ``steps`` optimizer steps (call ``.train()``). The teacher is frozen and runs under ``no_grad``."""
    from transformers import Trainer, TrainingArguments

    if steps < 1 or batch_size < 1:
        raise LabkitError(f"steps={steps}, batch_size={batch_size}: both must be at least 1")
    if train_ids.dim() != 2 or len(train_ids) < batch_size:
        raise LabkitError(f"train_ids has shape {tuple(train_ids.shape)}; give [N, L] with N >= batch_size")
    teacher.eval().requires_grad_(False)

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model(input_ids=ids, use_cache=False)
            with torch.no_grad():
                t = teacher(input_ids=ids.to(next(teacher.parameters()).device), use_cache=False).logits
            loss = kd_lm_loss(out.logits, t.to(out.logits.device), ids, kd_weight, temperature)
            return (loss, out) if return_outputs else loss

    rows = [{"input_ids": r} for r in train_ids.cpu()]
    args = TrainingArguments(output_dir=output_dir or tempfile.mkdtemp(prefix="labkit-kd-"), max_steps=steps,
                             per_device_train_batch_size=batch_size, learning_rate=lr, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to=[], seed=seed,
                             use_cpu=next(student.parameters()).device.type == "cpu",
                             disable_tqdm=True, dataloader_pin_memory=False, remove_unused_columns=False)
    collate = lambda batch: {"input_ids": torch.stack([b["input_ids"] for b in batch])}  # noqa: E731
    return KDTrainer(model=student, args=args, train_dataset=rows, data_collator=collate)


def logged_losses(trainer: Any) -> list[float]:
    """The training loss of every logged step, from the trainer's log history."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
