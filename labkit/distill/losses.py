"""Distillation losses as pure functions of logits (and one small module for hidden states).

* :func:`hinton_loss` — Hinton, Vinyals & Dean (2015): KL between the teacher's and the student's distributions
  softened by a temperature T, scaled by T² (softening shrinks the soft-target gradients by 1/T², so T² keeps
  their size comparable as T changes), mixed with the ordinary hard-label loss by ``alpha``.
* :func:`token_kd_loss` — the same idea per token over an LM's vocabulary: forward KL(teacher ‖ student), the
  usual choice, or reverse KL(student ‖ teacher), which MiniLLM argues suits generative students (it is
  mode-seeking: the student is not pushed to cover tokens the teacher finds unlikely).
* :class:`HiddenStateLoss` — match intermediate representations (cosine or MSE), through a learned projection when
  the student is narrower than the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit import LabkitError


def _check(temperature: float, alpha: float | None = None) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise LabkitError(f"temperature={temperature!r} must be > 0 (1 = the model's own distribution)")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise LabkitError(f"alpha={alpha!r} must be in [0, 1] (1 = soft targets only, 0 = hard labels only)")


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise LabkitError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ: "
                          "teacher and student must predict over the same classes / vocabulary")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) between temperature-softened distributions, averaged over rows (not T²-scaled)."""
    _check(temperature)
    _check_shapes(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_s.reshape(-1, log_p_s.shape[-1]), log_p_t.reshape(-1, log_p_t.shape[-1]),
                    log_target=True, reduction="batchmean")


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)``.

    ``labels`` may be None (no hard labels: ``alpha`` must be 1). The teacher's logits are detached: gradients
    flow only into the student.
    """
    _check(temperature, alpha)
    soft = soft_kl(student_logits, teacher_logits, temperature) * temperature**2
    if labels is None:
        if alpha != 1:
            raise LabkitError(f"labels=None needs alpha=1 (soft targets only); got alpha={alpha}")
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits.float(), labels)


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  direction: str = "forward", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL over the vocabulary, averaged over the tokens where ``mask`` is True (all by default).

    ``direction="forward"``: KL(teacher ‖ student); ``"reverse"``: KL(student ‖ teacher). Scaled by T².
    """
    _check(temperature)
    _check_shapes(student_logits, teacher_logits)
    if direction not in ("forward", "reverse"):
        raise LabkitError(f"direction={direction!r}; allowed: 'forward' (KL(teacher‖student)) or 'reverse'")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "forward":
        per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    else:
        per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    if mask is not None:
        per_token = per_token[mask.bool()]
    return per_token.mean() * temperature**2


class HiddenStateLoss(nn.Module):
    """Distance between student and teacher hidden states ``[..., width]``; a learned linear projection maps the
    student's width to the teacher's when they differ (train it with the student)."""

    def __init__(self, student_width: int, teacher_width: int, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise LabkitError(f"kind={kind!r}; allowed: 'cosine' or 'mse'")
        self.kind = kind
        self.proj = nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width,
                                                                                   bias=False)

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        s, t = self.proj(student_hidden.float()), teacher_hidden.detach().float()
        if s.shape != t.shape:
            raise LabkitError(f"hidden states {tuple(s.shape)} (projected student) vs {tuple(t.shape)} (teacher)")
        if self.kind == "mse":
            return F.mse_loss(s, t)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
