"""Pictures of the paged KV cache, from engine snapshots (``LLM(..., record_history=True)``).

* :func:`kv_pool_figure` — the block pool: one cell per physical block, coloured by owner, hatched when
  shared, grey when free, the darker bar showing how many of its slots hold a token;
* :func:`block_tables_figure` — each running request's block table (logical block → physical block) beside
  the pool, so indirection is something you can see;
* :func:`admitted_figure` — how many requests run at once, step by step, for several engines on the same pool;
* :func:`waste_figure` — where the pool's slots went under each policy, in the vLLM paper's three kinds of waste;
* :func:`step_breakdown_figure` — where an engine step's time goes: its phases, and the forward's operators.
"""

from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.patches as mpatches
from matplotlib.figure import Figure

from labkit.viz.plots import finish_line_plot, new_figure
from labkit.viz.widgets import Explorer

CMAP = matplotlib.colormaps["tab20"]


def _draw_pool(ax, snap: dict[str, Any], cols: int) -> float:
    n, bs = snap["num_blocks"], snap["block_size"]
    rows = -(-n // cols)
    held = reserved = 0
    for b in range(n):
        r, c = divmod(b, cols)
        owners = snap["owners"].get(b, [])
        if owners:
            fill = max(0, snap["fill"].get(b, 0))
            held += fill
            reserved += bs
            color = CMAP(owners[0] % 20)
            ax.add_patch(mpatches.Rectangle((c, -r), 0.92, 0.92, color=color, alpha=0.35,
                                            hatch="///" if len(owners) > 1 else None))
            ax.add_patch(mpatches.Rectangle((c, -r), 0.92 * fill / bs, 0.92, color=color))
        else:
            ax.add_patch(mpatches.Rectangle((c, -r), 0.92, 0.92, color="#dddddd"))
    ax.set_xlim(-0.2, cols + 0.2)
    ax.set_ylim(-rows + 0.8, 1.1)
    ax.set_aspect("equal")
    ax.axis("off")
    return 100 * (reserved - held) / reserved if reserved else 0.0


def _title(snap: dict[str, Any], waste: float) -> str:
    return (f"step {snap['step']} · running {len(snap['running'])} · waiting {len(snap['waiting'])} · blocks used "
            f"{len(snap['owners'])}/{snap['num_blocks']} · waste {waste:.1f}% · preemptions {snap['preemptions']}")


def kv_pool_figure(snap: dict[str, Any], cols: int = 32) -> Figure:
    """The block pool of one engine snapshot (``LLMEngine.snapshot()``)."""
    rows = -(-snap["num_blocks"] // cols)
    fig = new_figure((min(12, 0.32 * cols + 1), 0.32 * rows + 1.6))
    ax = fig.subplots()
    ax.set_title(_title(snap, _draw_pool(ax, snap, cols)), fontsize=9)
    fig.tight_layout()
    return fig


def block_tables_figure(snap: dict[str, Any], cols: int = 16, max_requests: int = 8) -> Figure:
    """Left: every running request's block table, logical block i → the physical block id it names. Right:
    the pool those ids point into. Shared blocks (prefix caching, parallel samples) appear in several tables."""
    tables = dict(list(snap.get("block_tables", {}).items())[:max_requests])
    width = max((len(t) for t in tables.values()), default=1)
    rows = -(-snap["num_blocks"] // cols)
    fig = new_figure((12, max(2.4, 0.42 * max(len(tables), rows) + 1.4)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(width, 4), cols]})
    for row, (sid, table) in enumerate(tables.items()):
        color = CMAP(sid % 20)
        left.text(-0.3, -row + 0.45, f"req {sid}", ha="right", va="center", fontsize=8)
        for i, bid in enumerate(table):
            shared = len(snap["owners"].get(bid, [])) > 1
            left.add_patch(mpatches.Rectangle((i, -row), 0.92, 0.92, color=color, alpha=0.35,
                                              hatch="///" if shared else None))
            left.text(i + 0.46, -row + 0.46, str(bid), ha="center", va="center", fontsize=7)
    left.set_xlim(-2.2, width + 0.2)
    left.set_ylim(-max(len(tables), 1) + 0.8, 1.3)
    left.set_aspect("equal")
    left.axis("off")
    left.set_title("block tables: logical block → physical id", fontsize=9)
    waste = _draw_pool(right, snap, cols)
    right.set_title("the pool · " + _title(snap, waste).split(" · ", 1)[1], fontsize=8)
    fig.tight_layout()
    return fig


def admitted_figure(histories: dict[str, list[dict[str, Any]]]) -> Figure:
    """Requests running at once, step by step, for each engine (label → recorded history)."""
    fig = new_figure((7.5, 3.4))
    ax = fig.subplots()
    for label, hist in histories.items():
        ax.step(range(len(hist)), [len(s["running"]) for s in hist], where="post",
                label=f"{label} ({len(hist)} steps)")
    return finish_line_plot(fig, ax, "engine step", "requests running at once",
                            "the same requests, the same KV pool: how many fit at once")


WASTE_KINDS = {"used": ("holds a token's KV", "tab:green"),
               "reserved": ("reserved for tokens still to come", "tab:olive"),
               "internal_fragmentation": ("internal fragmentation (never used)", "tab:red"),
               "external_fragmentation": ("external fragmentation (stranded free)", "tab:purple")}


def waste_figure(breakdowns: dict[str, dict[str, float]]) -> Figure:
    """One stacked bar per policy (label → ``EngineStats.waste_breakdown_pct()``): % of the pool, over all steps."""
    fig = new_figure((7.5, 0.8 + 0.6 * len(breakdowns)))
    ax = fig.subplots()
    labels = list(breakdowns)
    left = [0.0] * len(labels)
    for kind, (text, color) in WASTE_KINDS.items():
        widths = [breakdowns[name][kind] for name in labels]
        ax.barh(labels, widths, left=left, color=color, label=text)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the KV pool's slots, summed over the run's steps (the rest is free and usable)")
    ax.legend(fontsize=7, loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def batch_roofline_figure(rows: list[dict[str, Any]]) -> Figure:
    """Measured decode tokens/s against batch size (rows of ``serving.batch_sweep``), under the machine's
    memory-bound and compute-bound ceilings."""
    fig = new_figure((7.5, 3.6))
    ax = fig.subplots()
    b = [r["batch"] for r in rows]
    ax.errorbar(b, [r["decode_tok_s"] for r in rows], marker="o", label="measured (median, min-max)",
                yerr=[[r["decode_tok_s"] - r["decode_tok_s_min"] for r in rows],
                      [r["decode_tok_s_max"] - r["decode_tok_s"] for r in rows]])
    ax.plot(b, [r["memory_bound_tok_s"] for r in rows], "--", label="memory ceiling: B x bandwidth / weight bytes")
    ax.plot(b, [r["compute_bound_tok_s"] for r in rows], ":", label="compute ceiling: GEMM FLOP/s / (2 x params)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return finish_line_plot(fig, ax, "requests decoding together (batch)", "decode tokens/s (all requests)",
                            "decode speed vs batch, under this machine's measured ceilings")


def step_breakdown_figure(breakdown: dict[str, dict[str, float]]) -> Figure:
    """Two stacked bars from :func:`labkit.serve.profile.step_breakdown`: the engine step's phases (ms per step over
    the run) and the forward's operator groups (ms per step of the profiled window)."""
    fig = new_figure((8.5, 2.6))
    ax = fig.subplots()
    colors = iter(matplotlib.colormaps["tab20"].colors)  # 20: more than the phases and groups together
    for label, parts in (("step phases (whole run)", breakdown["phases"]),
                         ("operators (profiled window)", breakdown["ops"])):
        left = 0.0
        for name, ms in parts.items():
            if ms > 0:
                ax.barh(label, ms, left=left, color=next(colors), label=name)
                left += ms
    ax.set_xlabel("milliseconds per engine step")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


class KVCacheViewer(Explorer):
    """Step through an engine's recorded schedule (``LLM(..., record_history=True)``).

    With ``rerun(block_size, num_blocks, prefix_caching) -> history`` it also shows those three controls and
    reruns the workload when they change (see :func:`kv_history` for a ready-made ``rerun``).
    """

    def __init__(self, history: list[dict[str, Any]] | None = None, cols: int = 16, rerun=None,
                 block_size: int = 16, num_blocks: int = 24, prefix_caching: bool = False) -> None:
        import ipywidgets as W

        if rerun is None and not history:
            from labkit import LabkitError

            raise LabkitError("history is empty: create the LLM with record_history=True and generate first")
        self.rerun, self.cols = rerun, cols
        self.history = history or rerun(block_size, num_blocks, prefix_caching)
        self.step = W.IntSlider(min=0, max=len(self.history) - 1, value=0, description="step",
                                continuous_update=False)
        self.play = W.Play(min=0, max=len(self.history) - 1, interval=400)
        W.jslink((self.play, "value"), (self.step, "value"))
        self.watch(self.step)
        rows = [W.HBox([self.play, self.step])]
        if rerun is not None:
            self.block_size = W.Dropdown(options=[1, 4, 8, 16, 32], value=block_size, description="block_size")
            self.num_blocks = W.IntSlider(min=8, max=256, value=num_blocks, description="num_blocks",
                                          continuous_update=False)
            self.prefix = W.Checkbox(value=prefix_caching, description="prefix caching")
            self.watch(self.block_size, self.num_blocks, self.prefix, then=self.reload)
            rows.insert(0, W.HBox([self.block_size, self.num_blocks, self.prefix]))
        self.layout(*rows)

    def reload(self) -> list[dict[str, Any]]:
        """Rerun the workload with the current controls and go back to step 0."""
        try:
            self.history = self.rerun(self.block_size.value, self.num_blocks.value, self.prefix.value)
        except ValueError as exc:  # e.g. a pool too small for one request
            self.show(f"cannot run: {exc}")
            return []
        self.step.max = self.play.max = len(self.history) - 1
        self.step.value = 0
        self.update()
        return self.history

    def update(self) -> dict[str, Any]:
        snap = self.history[min(self.step.value, len(self.history) - 1)]
        self.show(block_tables_figure(snap, self.cols), f"scheduled (request, tokens): {snap['scheduled']} · "
                  f"prefix-hit blocks so far: {snap.get('prefix_hit_blocks', 0)}")
        return snap
