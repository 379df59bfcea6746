"""Distillation losses against hand-computed values, students' shapes and reload, the trainer's determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from labkit.distill import (
    HiddenStateLoss,
    hinton_loss,
    layer_dropped_lm,
    load_student,
    narrow_cnn,
    save_student,
    token_kd_loss,
    train,
)
from tests.conftest import tiny_llama


def test_hinton_loss_matches_a_hand_computed_value():
    s, t, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0])
    T, a = 2.0, 0.7
    ps = [math.exp(v / T) for v in (2.0, 0.0, -1.0)]
    pt = [math.exp(v / T) for v in (1.0, 1.0, 0.0)]
    ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    assert float(hinton_loss(s, t, y, temperature=T, alpha=a)) == pytest.approx(a * T * T * kl + (1 - a) * ce, rel=1e-5)


def test_t_squared_keeps_soft_gradients_comparable_across_temperatures():
    torch.manual_seed(0)
    t = torch.randn(64, 10) * 2
    norms = {}
    for T in (1.0, 4.0, 16.0):
        s = (torch.randn(64, 10) * 2).requires_grad_()
        hinton_loss(s, t, None, temperature=T, alpha=1.0).backward()
        norms[T] = float(s.grad.norm())
    # without T² the gradient would shrink by ~1/T² (256x at T=16); with it, it shrinks only ~1/T
    assert norms[16.0] > norms[1.0] / 64


def test_gradients_flow_only_into_the_student():
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5, requires_grad=True)
    hinton_loss(s, t, torch.zeros(8, dtype=torch.long)).backward()
    assert s.grad is not None and t.grad is None
    s.grad = None
    token_kd_loss(s.view(2, 4, 5), t.view(2, 4, 5)).backward()
    assert s.grad is not None and t.grad is None


def test_token_kd_forward_and_reverse_kl():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    fwd = token_kd_loss(s, t, direction="forward")
    rev = token_kd_loss(s, t, direction="reverse")
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    assert float(fwd) == pytest.approx(float((lt.exp() * (lt - ls)).sum(-1).mean()), rel=1e-5)
    assert float(rev) == pytest.approx(float((ls.exp() * (ls - lt)).sum(-1).mean()), rel=1e-5)
    assert float(token_kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert float(token_kd_loss(s, t, mask=mask)) == pytest.approx(
        float((lt.exp() * (lt - ls)).sum(-1)[mask].mean()), rel=1e-5)


def test_hidden_state_loss_projects_a_narrower_student():
    loss = HiddenStateLoss(16, 32, kind="cosine")
    assert isinstance(loss.proj, torch.nn.Linear)
    assert float(HiddenStateLoss(8, 8, "mse")(torch.ones(2, 8), torch.ones(2, 8))) == 0.0
    assert float(loss(torch.randn(4, 16), torch.randn(4, 32))) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0), "temperature=0 must be > 0"), (dict(temperature=-1), "temperature=-1"),
    (dict(alpha=1.5), r"alpha=1.5 must be in \[0, 1\]"), (dict(alpha=-0.1), "alpha=-0.1"),
])
def test_bad_loss_arguments_are_clear(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)


def test_teacher_and_student_must_share_their_outputs():
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\) differ"):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, alpha=1.0)
    with pytest.raises(ValueError, match="direction='sideways'"):
        token_kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), direction="sideways")


def test_narrow_cnn_is_at_most_half_the_teacher():
    from labkit.zoo import DigitsCNN

    student, teacher = narrow_cnn(16), DigitsCNN()
    assert sum(p.numel() for p in student.parameters()) <= 0.5 * sum(p.numel() for p in teacher.parameters())
    assert student(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="width=3"):
        narrow_cnn(3)


def test_layer_dropped_student_copies_layers_generates_and_reloads(tmp_path):
    teacher = tiny_llama(seed=4, num_hidden_layers=4)
    student = layer_dropped_lm(teacher, keep_every=2)
    assert student.config.num_hidden_layers == 2 == len(student.model.layers)
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[3].self_attn.q_proj.weight)
    assert (
        student.model.layers[0].mlp.up_proj.weight.data_ptr() != teacher.model.layers[1].mlp.up_proj.weight.data_ptr()
    )
    ids = torch.tensor([[5, 6, 7]])
    out = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    back = load_student(save_student(student, tmp_path / "s"))
    assert back.config.num_hidden_layers == 2
    assert torch.allclose(back(ids).logits, student(ids).logits)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep=[]), "keeps no layer"),
        (dict(keep=[0, 9]), "layer 9 does not exist"),
        (dict(keep_every=0), "keep_every=0"),
    ],
)
def test_bad_keep_patterns_are_clear(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_dropped_lm(tiny_llama(num_hidden_layers=4), **kwargs)


def test_load_student_without_a_saved_model_is_clear(tmp_path):
    with pytest.raises(ValueError, match="no saved student"):
        load_student(tmp_path)


def test_training_is_deterministic_under_a_fixed_seed():
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

    def fit():
        torch.manual_seed(3)
        m = narrow_cnn(8)
        h = train(m, (x, y), lambda mm, b: F.cross_entropy(mm(b[0]), b[1]), epochs=3, batch_size=16, seed=3,
                  eval_fn=lambda mm: float(mm(x).sum()))
        return h, m

    (h1, m1), (h2, m2) = fit(), fit()
    assert h1.train_loss == h2.train_loss and h1.metric == h2.metric and h1.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    h3 = train(narrow_cnn(8), (x, y), lambda mm, b: F.cross_entropy(mm(b[0]), b[1]), epochs=50, batch_size=16,
               max_steps=5)
    assert h3.steps == 5 and h3.examples == 80
