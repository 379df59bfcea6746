"""Knowledge distillation: ``losses`` (Hinton, hidden-state, token-level KD), ``students`` (built from a teacher),
and the training loop (:mod:`labkit.train`, shared: one loop for teacher, scratch student, KD student and a pruned
model's recovery)."""

from labkit.distill.losses import HiddenStateLoss, hinton_loss, token_kd_loss
from labkit.distill.students import layer_dropped_lm, load_student, narrow_cnn, save_student
from labkit.train import History, train

__all__ = ["History", "HiddenStateLoss", "hinton_loss", "layer_dropped_lm", "load_student", "narrow_cnn",
           "save_student", "token_kd_loss", "train"]
