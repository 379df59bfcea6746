"""KD through transformers' Trainer: the same loss as the kit's, and it really trains the student."""

import pytest
import torch

from labkit import LabkitError
from labkit.distill.hf_trainer import kd_lm_loss, kd_trainer, logged_losses
from labkit.distill.losses import token_kd_loss
from tests.conftest import tiny_llama


def test_kd_lm_loss_mixes_the_kits_token_kl_with_next_token_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    assert torch.allclose(kd_lm_loss(s, t, ids, kd_weight=1.0), token_kd_loss(s, t))
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(kd_lm_loss(s, t, ids, kd_weight=0.0), ce)
    with pytest.raises(ValueError, match="kd_weight=1.5"):
        kd_lm_loss(s, t, ids, kd_weight=1.5)


def test_trainer_distils_and_its_first_loss_is_the_kits():
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ids = torch.randint(3, 49152, (4, 12), generator=torch.Generator().manual_seed(3))
    first = ids[:2]
    with torch.no_grad():
        want = float(kd_lm_loss(student(input_ids=first).logits, teacher(input_ids=first).logits, first))
    trainer = kd_trainer(student, teacher, first, steps=12, batch_size=2, lr=3e-3)
    trainer.train()  # one batch an epoch, both rows (in the trainer's order: the loss does not care)
    losses = logged_losses(trainer)
    assert len(losses) == 12
    assert losses[0] == pytest.approx(want, rel=1e-4)  # step 1 is logged before its update: the kit's loss
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.grad is None or not p.requires_grad for p in teacher.parameters())
    with pytest.raises(LabkitError, match="steps=0"):
        kd_trainer(student, teacher, ids, steps=0)
