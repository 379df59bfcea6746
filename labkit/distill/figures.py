"""Pictures for distillation: a teacher's distribution softened by temperature, and the temperature explorer's
state → figure function (the widget in ``widgets.py`` only wires a slider to it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labkit.results import Record
from labkit.viz.plots import finish_line_plot, new_figure
from labkit.viz.widgets import Explorer


def softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def entropy_bits(p: torch.Tensor) -> float:
    return float(-(p * torch.log2(p.clamp_min(1e-12))).sum())


def temperatures_figure(logits: torch.Tensor, temperatures=(1, 2, 4, 8), title: str = ""):
    """The teacher's distribution over classes for one example at several temperatures."""
    fig = new_figure((8, 3.2))
    ax = fig.subplots()
    k = logits.shape[-1]
    width = 0.8 / len(temperatures)
    for i, t in enumerate(temperatures):
        p = softened(logits, t)
        ax.bar([c + i * width for c in range(k)], p.tolist(), width=width,
               label=f"T={t:g} (entropy {entropy_bits(p):.2f} bits)")
    ax.set_xticks([c + 0.4 - width / 2 for c in range(k)], [str(c) for c in range(k)])
    ax.set_xlabel("class")
    ax.set_ylabel("teacher probability")
    ax.legend(fontsize=8)
    ax.set_title(title or "soft targets: the teacher's distribution at several temperatures", fontsize=10)
    fig.tight_layout()
    return fig


def temperature_explorer_figure(image: torch.Tensor, logits: torch.Tensor, label: int, temperature: float,
                                record=None) -> tuple[Any, dict[str, Any]]:
    """One example: the image, the teacher's distribution at ``temperature``, its entropy, and — from the
    record — the measured accuracy of the KD student trained at the nearest temperature of the sweep."""
    p = softened(logits, temperature)
    stats: dict[str, Any] = {"temperature": temperature, "entropy_bits": entropy_bits(p),
                             "top": int(p.argmax()), "top_prob": float(p.max())}
    if record is not None:
        sweep = {float(v["name"].rsplit("T", 1)[1]): v for v in record.variants if v["name"].startswith("student-kd-T")}
        if sweep:
            nearest = min(sweep, key=lambda t: abs(t - temperature))
            stats.update(nearest_temperature=nearest, kd_accuracy=sweep[nearest]["accuracy"],
                         kd_accuracy_std=sweep[nearest]["accuracy_std"])
    fig = new_figure((9, 3))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3]})
    a.imshow(image.reshape(8, 8).numpy(), cmap="gray_r")
    a.set_title(f"label {label}", fontsize=9)
    a.axis("off")
    b.bar(range(len(p)), p.tolist(), color=["#C44E52" if c == label else "#4C72B0" for c in range(len(p))])
    b.set_ylim(0, 1)
    b.set_xticks(range(len(p)))
    title = f"T={temperature:g}: entropy {stats['entropy_bits']:.2f} bits"
    if "kd_accuracy" in stats:
        title += (f" · KD student trained at T={stats['nearest_temperature']:g}: "
                  f"{100 * stats['kd_accuracy']:.1f}% ± {100 * stats['kd_accuracy_std']:.1f}")
    b.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig, stats


def accuracy_figure(record, names: list[str] | None = None):
    """Test accuracy of each variant, seed mean with ± one standard deviation, and params on the labels."""
    rows = [v for v in record.variants if "accuracy" in v and (names is None or v["name"] in names)]
    fig = new_figure((7.5, 0.42 * len(rows) + 1.4))
    ax = fig.subplots()
    labels = [f"{v['name']} ({v['params'] / 1e3:.1f}k params)" for v in rows]
    ax.barh(labels, [100 * v["accuracy"] for v in rows], xerr=[100 * v.get("accuracy_std", 0) for v in rows],
            color=["#55A868" if v["name"] == "teacher" else "#4C72B0" for v in rows], capsize=3)
    for i, v in enumerate(rows):
        ax.text(100 * v["accuracy"], i, f" {100 * v['accuracy']:.1f}%", va="center", fontsize=8)
    ax.invert_yaxis()
    lo = min(100 * v["accuracy"] for v in rows)
    ax.set_xlim(max(0, lo - 10), 100)
    ax.set_xlabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title("teacher vs students on digits", fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(record, names=("student-scratch", "student-kd")):
    """Test accuracy after every epoch (first seed) for the named variants."""
    fig = new_figure((7, 3.2))
    ax = fig.subplots()
    for v in record.variants:
        if v["name"] in names and v.get("accuracy_curve_seed0"):
            curve = v["accuracy_curve_seed0"]
            ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], label=v["name"])
    return finish_line_plot(fig, ax, "epoch", "test accuracy, %", "learning curves, seed 0")


class TemperatureExplorer(Explorer):
    """A temperature slider over real examples → the teacher's softened distribution, its entropy, and the
    measured accuracy of the KD student trained at the nearest temperature (from the record)."""

    def __init__(self, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, record: Record | None = None,
                 n_examples: int = 20) -> None:
        import ipywidgets as W

        self.images, self.labels, self.record = images[:n_examples], labels[:n_examples], record
        with torch.no_grad():
            self.logits = teacher(self.images)
        self.temperature = W.FloatLogSlider(value=4, base=2, min=-1, max=4, step=0.25, description="T",
                                            continuous_update=False)
        self.example = W.IntSlider(value=0, min=0, max=len(self.images) - 1, description="example")
        self.layout(W.HBox([self.example, self.temperature]))
        self.watch(self.temperature, self.example)

    def update(self) -> dict[str, Any]:
        i = self.example.value
        fig, stats = temperature_explorer_figure(self.images[i], self.logits[i], int(self.labels[i]),
                                                 self.temperature.value, self.record)
        self.show(fig)
        return stats
