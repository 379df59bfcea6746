"""HTML report: every record in ``results/`` as a table and its figures, embedded in one file."""

from __future__ import annotations

import base64
import functools
import html
import io
import re
from pathlib import Path

from labkit import LabkitError, experiments, select
from labkit.results import Record, atomic_write_text, ensure_writable, load_all

_CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
.wrap{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:13px;margin:.6em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
td:first-child,td:nth-child(2){text-align:left}.meta{color:#666;font-size:12px}.headline{font-size:15px;margin:.3em 0}
img{max-width:100%;height:auto}details{margin:.5em 0}summary{cursor:pointer;color:#345}
nav a{margin-right:1em}.ok{color:#2a7a2a}.miss{color:#b22}.model{font-weight:600;margin:.8em 0 0}"""

QUESTIONS = (  # one table per question a reader asks of a record, each with the columns that answer it
    ("What does it cost?", ("params", "weight_bytes", "bits_per_param_quantized", "peak_memory_bytes",
                            "nonzero_weights", "csr_weight_bytes", "macs", "graph_nodes", "kv_waste_pct",
                            "peak_blocks")),
    ("What does it keep?", ("accuracy", "perplexity", "perplexity_ratio", "cosine_to_reference", "matches_reference",
                            "requests_matching", "matches_greedy", "acceptance_rate")),
    ("How fast is it?", ("latency_ms_median", "tokens_per_s", "prefill_tokens_per_s", "output_tokens_per_s",
                         "ttft_ms_p50", "tpot_ms_p50", "decode_tok_s", "x_fp32_same_batch",
                         "pct_of_bandwidth_ceiling", "speedup_vs_baseline")),
)
SETTINGS = ("stage", "method", "workload", "batch", "seq_len")  # shown where they vary: the row's setting
LABELS = {"weight_bytes": "memory", "latency_ms_median": "latency (median ± IQR)", "speedup_vs_baseline": "× baseline",
          "output_tokens_per_s": "output tok/s", "tokens_per_s": "tok/s", "decode_tokens_per_s": "decode tok/s",
          "cosine_to_reference": "cosine", "kv_waste_pct": "KV waste %", "on_pareto_front": "Pareto",
"bits_per_param_quantized": "bits/param (quantized layers)",
          "peak_memory_bytes": "peak memory", "nonzero_weights": "non-zero weights", "csr_weight_bytes": "as CSR",
          "graph_nodes": "graph nodes", "peak_blocks": "peak KV blocks", "perplexity_ratio": "× baseline perplexity",
          "matches_reference": "same tokens", "requests_matching": "requests matching", "matches_greedy": "= greedy",
          "acceptance_rate": "acceptance", "prefill_tokens_per_s": "prefill tok/s", "ttft_ms_p50": "TTFT p50 (ms)",
          "tpot_ms_p50": "TPOT p50 (ms)", "decode_tok_s": "decode tok/s", "x_fp32_same_batch": "× fp32 same batch",
          "pct_of_bandwidth_ceiling": "% of bandwidth ceiling", "name": "variant", "seq_len": "sequence"}
BYTES = ("weight_bytes", "peak_memory_bytes", "csr_weight_bytes")


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


@functools.cache
def template(name: str):
    """A Jinja2 template of ``labkit/templates`` with autoescaping on (loaded once per process): learner names,
    checker messages and record fields reach these pages, and every value is escaped unless the code marks it
    safe."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("labkit", "templates"), autoescape=select_autoescape(default=True))
    return env.get_template(name)


def format_cell(key: str, row: dict) -> str:
    """One cell in the units people read (MB, ms ± IQR, ×, %)."""
    from labkit.select import human

    v = row.get(key)
    if v is None or v != v:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key == "latency_ms_median":
        iqr = row.get("latency_ms_iqr")
        return f"{v:.3g} ms" + (f" ± {iqr:.2g}" if isinstance(iqr, float) else "")
    if key == "speedup_vs_baseline":
        return f"{v:.2f}×"
    if key in ("accuracy",):
        return f"{100 * v:.1f} %"
    if key in BYTES:
        return human("weight_bytes", v)
    if key == "params":
        return human(key, v)
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)  # plain text: the template escapes every cell


def headline(rec: Record, targets: bool = True) -> str:
    """The measured claim in one sentence: the best speed-up or the smallest variant and what it cost in quality,
    then (``targets``) how many of the record's targets hold."""
    rows = [v for v in rec.variants if isinstance(v.get("speedup_vs_baseline"), (int, float))]
    parts = []

    def keeps_quality(v: dict) -> bool:  # select.KEEPS_QUALITY against its baseline
        ones = [b for b in rows if b["speedup_vs_baseline"] == 1.0]  # the baseline: its own model's, else the record's
        base = next((b for b in ones if b.get("model") == v.get("model")), ones[0] if ones else None)
        return base is None or select.keeps_quality(v, base)

    good = [v for v in rows if keeps_quality(v)]
    if good:
        best = max(good, key=lambda v: v["speedup_vs_baseline"])
        q = next((k for k in ("accuracy", "perplexity", "cosine_to_reference") if k in best), None)
        parts.append(f"Fastest at baseline quality: <b>{html.escape(str(best.get('model', '')))} "
                     f"{html.escape(best['name'])}</b>, {best['speedup_vs_baseline']:.2f}× its baseline"
                     + (f" ({q} {format_cell(q, best)})" if q else ""))
    own = getattr(experiments.get(rec.experiment), "headline", None) if rec.experiment in experiments.available() \
        else None
    if own is not None and (text := own(rec)):  # an experiment whose claim is not a speed-up says it itself
        parts.append(html.escape(text))
    sized = [v for v in rec.variants if isinstance(v.get("weight_bytes"), (int, float))]
    if sized and len({v.get("weight_bytes") for v in sized}) > 1:
        small = min(sized, key=lambda v: v["weight_bytes"])
        parts.append(f"smallest: {html.escape(str(small.get('model', '')))} {html.escape(small['name'])} "
                     f"({format_cell('weight_bytes', small)})")
    if targets and rec.config.get("targets"):
        met, measured, unmeasured = _targets_met(rec)
        cls = "ok" if met == measured else "miss"
        parts.append(f"<span class={cls}>{met} of {measured} targets met"
                     + (f", {unmeasured} not measured here" if unmeasured else "") + "</span>")
    if rec.config.get("status") == "skipped":
        parts.append(f"skipped on this machine: {html.escape(str(rec.config.get('reason')))}")
    return "; ".join(parts) + "." if parts else ""


def _targets_met(rec: Record) -> tuple[int, int, int]:
    """(targets met, targets measured, targets not measured) of a record."""
    targets = (rec.config.get("targets") or {}).values()
    measured = sum(1 for t in targets if t.get("ok") is not None)
    return sum(1 for t in targets if t.get("ok")), measured, len(targets) - measured


def _table(rows: list[dict], cols: list[str], fmt) -> dict[str, list]:
    return {"head": [LABELS.get(c, c) for c in cols], "rows": [[fmt(c, r) for c in cols] for r in rows]}


def questions(rec: Record) -> list[dict]:
    """The record as one table per question (:data:`QUESTIONS`) and model: only the rows that answer the question
    and only the columns some row fills, so MiniLM never sits beside SmolLM2 and a batch sweep never shows up as
    empty memory rows. Each table is ``{"question", "model", "head", "rows"}`` in the units people read."""
    from labkit.viz.plots import models_of

    out = []
    for question, wanted in QUESTIONS:
        for model in models_of(rec):
            rows = [v for v in rec.variants if v.get("model") == model]
            cols = [c for c in wanted if any(isinstance(r.get(c), (int, float)) and r[c] == r[c] for r in rows)]
            answer = [r for r in rows if any(isinstance(r.get(c), (int, float)) and r[c] == r[c] for c in cols)]
            if answer:
                setting = [c for c in SETTINGS if len({str(r.get(c, "")) for r in answer}) > 1]
                out.append({"question": question, "model": model or rec.experiment,
                            **_table(answer, ["name", *setting, *cols], format_cell)})
    return out


def full_table(rec: Record) -> dict[str, list]:
    """Every field of every variant (but provenance, recipes and per-run lists), as stored."""
    cols = [c for c in rec.to_frame().columns if c not in ("provenance", "recipe") and not c.endswith("_runs")]
    return _table(rec.variants, cols, lambda c, r: _fmt(r.get(c)) if r.get(c) == r.get(c) and c in r else "")


def section(rec: Record, report_dir: Path | None = None) -> dict:
    """What the report shows for one record (the template escapes every string; only the headline is markup)."""
    from markupsafe import Markup

    hw = rec.env.get("gpu") or {"name": f"{rec.env.get('cpu')} ({rec.env.get('torch_threads')} threads)"}
    nb = experiments.notebook(rec.experiment)
    rendered = report_dir is not None and nb is not None and (report_dir / "notebooks" / f"{nb}.html").exists()
    return {"experiment": rec.experiment, "headline": Markup(headline(rec)),  # built from escaped parts
            "env": f"{hw['name']} · torch {rec.env.get('libraries', {}).get('torch')} · python "
                   f"{rec.env.get('python')} · {rec.created_at} · labkit {rec.labkit_version}",
            "notebook": nb, "notebook_html": rendered, "n_variants": len(rec.variants),
            "questions": questions(rec), "full": full_table(rec),
            "figures": [_fig_png(f) for f in experiments.figures(rec)]}


def build(results_dir: str | Path = "results", out: str | Path = "reports/index.html") -> Path:
    """Render every record under ``results_dir`` into ``out`` (written atomically), in the notebooks' order."""
    out = Path(out)
    ensure_writable(out.parent)
    records = load_all(results_dir)
    if not records:
        raise LabkitError(f"no result records in {str(results_dir)!r}; run `labkit run EXPERIMENT --quick` first")
    order = experiments.available()  # the notebooks' order; records of unknown experiments last
    records.sort(key=lambda r: (order.index(r.experiment) if r.experiment in order else len(order), r.experiment))
    doc = template("report.html.j2").render(css=_CSS, sections=[section(r, out.parent) for r in records])
    return atomic_write_text(out, doc)


README_BEGIN = "<!-- results: generated from labkit/reference by `make readme`; a test keeps them equal -->"
README_END = "<!-- results: end -->"


def readme_table() -> str:
    """The headline of every experiment's newest reference record, as the Markdown table README shows."""
    from labkit import experiments, results

    out = ["| lesson | experiment | measured on | headline | targets met |", "|---|---|---|---|---|"]
    for name in experiments.available():
        ref = results.load_reference(name)
        if ref is None:
            continue
        rec, hardware = ref
        text = html.unescape(re.sub(r"<[^>]+>", "", headline(rec, targets=False))).rstrip(".")
        met, measured, unmeasured = _targets_met(rec)
        out.append(f"| {experiments.notebook(name).split('_')[0]} | `{name}` | {hardware} ({rec.created_at[:10]}) | "
                   f"{text or '—'} | {met} of {measured}" + (f" ({unmeasured} not measured)" if unmeasured else "")
                   + " |")
    return "\n".join(out) + "\n"


def update_readme(path: str | Path = "README.md") -> bool:
    """Rewrite the block between README's markers with :func:`readme_table`; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise LabkitError(f"{path}: the results markers are missing ({README_BEGIN!r} ... {README_END!r})")
    new = f"{head}{README_BEGIN}\n{readme_table()}{README_END}{tail}"
    if new != text:
        atomic_write_text(path, new)
    return new != text
