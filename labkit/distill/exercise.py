"""Notebook 03: Hinton's loss, checked against ``labkit.distill.losses.hinton_loss``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, each, gen

NOTEBOOK = "03"


def _kit_hinton(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.9):
    from labkit.distill.losses import hinton_loss

    return hinton_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)


def _check_hinton(fn: Callable) -> str:
    g = gen(6)
    offset_seen = False
    for temperature, alpha in each(((1.0, 0.5), (4.0, 0.9), (8.0, 1.0), (2.0, 0.0))):
        s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
        y = torch.randint(0, 10, (16,), generator=g)
        got, want = fn(s, t, y, temperature, alpha), _kit_hinton(s, t, y, temperature, alpha)
        if not isinstance(got, torch.Tensor) or got.numel() != 1:
            raise Mismatch("return the loss as a single-number tensor (average over the batch)")
        if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5) and _same_student_gradients(
                fn, s, t, y, temperature, alpha):
            offset_seen = True  # Hinton's own soft cross-entropy: KL plus the teacher's entropy, same gradients
            continue
        if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
            soft_only = _kit_hinton(s, t, y, temperature, 1.0)
            if temperature != 1 and alpha > 0 and torch.allclose(
                    got.float(), want - alpha * soft_only * (1 - 1 / temperature**2), rtol=1e-4, atol=1e-5):
                raise Mismatch(f"T={temperature:g}: the soft term is missing its T² factor (softening shrinks its "
                               "gradients by 1/T²; multiply the KL by T² to keep them comparable)")
            raise Mismatch(f"T={temperature:g}, alpha={alpha:g}: your loss is {float(got):.5f}, the kit's "
                           f"{float(want):.5f} — check the KL direction KL(teacher ‖ student), the T² factor and the "
                           "alpha mix")
    s = torch.randn(4, 10, generator=g, requires_grad=True)
    t = torch.randn(4, 10, generator=g, requires_grad=True)
    fn(s, t, torch.zeros(4, dtype=torch.long), 4.0, 0.9).backward()
    if t.grad is not None and t.grad.abs().sum() > 0:
        raise Mismatch("gradient reached the teacher's logits: detach them — only the student learns")
    if offset_seen:
        return ("your soft term is Hinton's cross-entropy with the teacher's soft targets: it differs from the "
                "kit's KL by the teacher's entropy, a constant, so the student gets the same gradients; no gradient "
                "into the teacher")
    return "T² · KL(teacher_T ‖ student_T) mixed with cross-entropy by alpha; no gradient into the teacher"


def _same_student_gradients(fn: Callable, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float,
                            alpha: float) -> bool:
    """Whether ``fn`` and the kit's loss give the student's logits the same gradient (a loss that differs only by a
    constant, such as cross-entropy instead of KL against the soft targets, trains identically)."""
    grads = []
    for loss in (fn, _kit_hinton):
        leaf = s.detach().clone().requires_grad_(True)
        out = loss(leaf, t, y, temperature, alpha)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return False
        out.backward()
        grads.append(leaf.grad)
    return grads[0] is not None and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# name: (the kit's function, its checker)
EXERCISES = {"hinton_loss": (_kit_hinton, _check_hinton)}
