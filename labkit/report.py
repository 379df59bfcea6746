"""HTML report: every record in ``results/`` as a table and its figures, embedded in one file."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from labkit import LabkitError
from labkit.results import Record, atomic_write_text, ensure_writable, load_all
from labkit.viz.plots import record_figures

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}.meta{color:#666;font-size:12px}"""


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return html.escape(str(v))


def record_html(rec: Record) -> str:
    df = rec.to_frame()
    cols = [c for c in df.columns if c != "provenance"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row[c]) if row[c] == row[c] else ''}</td>" for c in cols) + "</tr>"
                   for _, row in df.iterrows())
    figs = "".join(f'<img src="data:image/png;base64,{_fig_png(f)}"/>' for f in record_figures(rec))
    hw = rec.env.get("gpu") or {"name": f"{rec.env.get('cpu')} ({rec.env.get('torch_threads')} threads)"}
    return (f"<h2>{html.escape(rec.experiment)}</h2><p class=meta>{html.escape(hw['name'])} · "
            f"torch {rec.env.get('libraries', {}).get('torch')} · {rec.created_at} · labkit {rec.labkit_version}</p>"
            f"<table><tr>{head}</tr>{body}</table>{figs}")


def build(results_dir: str | Path = "results", out: str | Path = "reports/index.html") -> Path:
    """Render every record under ``results_dir`` into ``out`` (written atomically)."""
    out = Path(out)
    ensure_writable(out.parent)
    records = load_all(results_dir)
    if not records:
        raise LabkitError(f"no result records in {str(results_dir)!r}; run `labkit run EXPERIMENT --quick` first")
    body = "".join(record_html(r) for r in records)
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>labkit report</title><style>{_CSS}</style>"
           f"</head><body><h1>labkit report</h1>{body}</body></html>")
    return atomic_write_text(out, doc)
