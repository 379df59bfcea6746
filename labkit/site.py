"""The course website (``make site``): every lesson executed in quick mode with its outputs, the measured results
as one table per question, the course map, the guides and the API reference from the docstrings.

Built offline by Sphinx with myst-nb and the book theme, from PyPI packages alone (Jupyter Book 2 fetches its theme
from the web while it builds). ``labkit site build OUT`` stages a source tree under ``OUT/src`` (the repository is
only read), keeps myst-nb's execution cache in ``OUT/jupyter_cache`` so that a rebuild re-runs only the lessons whose
code changed, and writes the pages to ``OUT/html``. With ``--repo OWNER/REPO`` each lesson opens with a Colab deep
link and files outside the site link to GitHub; without it there is no launch link at all.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from labkit import LabkitError, experiments, report, results
from labkit.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent  # the repository (the site is built from a checkout, not the wheel)
DOCS = ("course", "instructors", "usage", "results", "development")  # docs/*.md, in the sidebar's order
TOCTREES = (("Course", ["docs/course", "docs/instructors"]),
            ("Lessons", ["notebooks/*"]),
            ("Measured results", ["measured/index", "docs/results"]),
            ("Reference", ["docs/usage", "docs/development", "DESIGN", "api"]))
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           'fill="#4C72B0"/><text x="8" y="12" font-size="10" text-anchor="middle" fill="#fff">lk</text></svg>')
CSS = """/* wider lessons: the measured tables and code of a lesson need more than the theme's reading width */
.bd-page-width { max-width: 100rem; }
.bd-main .bd-content .bd-article-container { max-width: 64rem; }
.full-record { overflow-x: auto; font-size: 0.8em; }
"""
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")

CONF = '''# Written by labkit.site: the course website's Sphinx configuration.
project = "labkit"
html_title = "labkit: inference optimization, measured"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"]
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_theme_options = {theme!r}
html_favicon = "favicon.svg"
html_static_path = ["_static"]
html_css_files = ["labkit.css"]
html_context = {{"default_mode": "light"}}  # the theme logs a console error when no mode was ever chosen
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = {mode!r}
nb_execution_cache_path = {cache!r}
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_excludepatterns = {skip!r}
nb_ipywidgets_js = {{}}  # widgets need a kernel: no script from a CDN, the page shows each widget's text form
autosummary_generate = True
autodoc_default_options = {{"members": True, "undoc-members": False, "exclude-members": "set"}}
autodoc_mock_imports = ["tensorrt"]
suppress_warnings = ["myst.header", "autosummary", "autodoc", "ref.python", "misc.highlighting_failure",
                     "mystnb.unknown_mime_type", "toc.not_included"]
'''


def lesson_notebooks(notebooks_dir: Path, only: list[str] | None = None) -> list[Path]:
    """The lessons to execute: all of them, or those whose id (``"00"``, ``"01a"``) is in ``only``."""
    from labkit.course import lesson_id

    found = sorted(notebooks_dir.glob("*.ipynb"))
    ids = [lesson_id(p) for p in found]
    if only:
        unknown = sorted(set(only) - set(ids))
        if unknown:
            raise ValueError(f"lessons={','.join(only)!r}: no lesson {', '.join(unknown)}; the lessons are "
                             f"{', '.join(ids)}")
        return [p for p, i in zip(found, ids) if i in only]
    return found


def relink(markdown: str, page: str, pages: set[str], repo: str | None, ref: str) -> str:
    """``markdown`` of the staged page ``page`` (a path like ``docs/usage.md``) with every relative link that points
    outside the site made real: to the file on GitHub when ``repo`` is given, else plain text (no dead links)."""
    base = Path(page).parent

    def fix(m: re.Match) -> str:
        bang, text, target = m.groups()
        if bang or re.match(r"[a-z]+:|#|/", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(base / path).replace(os.sep, "/")
        if resolved in pages or resolved.startswith(".."):
            return m.group(0)
        if repo:
            return f"[{text}](https://github.com/{repo}/blob/{ref}/{resolved}{'#' + anchor if anchor else ''})"
        return text

    return _LINK.sub(fix, markdown)


def _md_table(t: dict) -> str:
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in t["head"]) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(t["head"]))) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def _html_table(t: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t["head"])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t["rows"])
    return f'<div class="full-record"><table class="table"><tr>{head}</tr>{rows}</table></div>'


def experiment_page(name: str, records: list[tuple[results.Record, str]], img_dir: Path) -> str:
    """One experiment's results page: for each machine that measured it, the headline, then one table per
    question and model (:func:`labkit.report.questions`), the figures, and the full record folded away."""
    nb = experiments.notebook(name)
    out = [f"({name}-results)=", f"# {name}", "",
           f"What it costs, what it keeps, how fast. Taught in [{nb}](../notebooks/{nb}.ipynb). Re-measure on your "
           f"machine with `labkit run {name} --quick` (or without `--quick` for the full sizes); `labkit report` "
           "renders your own records.", ""]
    for rec, hardware in records:
        text = html.unescape(re.sub(r"<[^>]+>", "", report.headline(rec)))
        out += [f"## Measured on {hardware} ({rec.created_at[:10]})", "", text, "",
                f"<p class=\"meta\">{html.escape(report.section(rec)['env'])}</p>", ""]
        question = None
        for t in report.questions(rec):
            if t["question"] != question:
                question = t["question"]
                out += [f"### {question}", ""]
            out += [f"**{t['model']}**", "", _md_table(t), ""]
        figs = experiments.figures(rec)
        if figs:
            out += ["### In pictures", ""]
        for i, fig in enumerate(figs):
            png = img_dir / f"{name}-{hardware}-{i}.png"
            fig.savefig(png, dpi=100, bbox_inches="tight")
            title = next((a.get_title() for a in fig.axes if a.get_title()), f"{name} figure {i + 1}")
            out += [f"![{title}](img/{png.name})", ""]
        out += [f"<details><summary>The full record: {len(rec.variants)} variants, every field</summary>",
                _html_table(report.full_table(rec)), "</details>", ""]
    return "\n".join(out)


def reference_records() -> dict[str, list[tuple[results.Record, str]]]:
    """Every experiment's reference records, one per machine, newest machine first."""
    found: dict[str, list[tuple[results.Record, str]]] = {}
    for d in results.reference_dirs():
        for path in sorted(d.glob("*/*.json")):
            found.setdefault(path.stem, []).append((results.load(path), path.parent.name))
    order = experiments.available()
    return {k: sorted(v, key=lambda r: r[0].created_at or "", reverse=True)
            for k, v in sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))}


def stage(src: Path, *, repo: str | None = None, ref: str = "main", lessons: list[str] | None = None,
          execute: bool = True, cache: Path | None = None) -> Path:
    """Write the site's source tree into ``src`` (emptied first): pages, notebooks, results, API, conf.py."""
    from labkit.course import colab_link, with_open_line

    if src.exists():
        shutil.rmtree(src)
    (src / "docs").mkdir(parents=True)
    (src / "notebooks").mkdir()
    img = src / "measured" / "img"
    img.mkdir(parents=True)
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    run = {p.name for p in lesson_notebooks(ROOT / "notebooks", lessons)}
    records = reference_records()
    pages = ({"index.md", "DESIGN.md", "api.md", "measured/index.md"} | {f"docs/{d}.md" for d in DOCS}
             | {f"notebooks/{p.name}" for p in notebooks} | {f"measured/{n}.md" for n in records})
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                text = relink("".join(cell["source"]), f"notebooks/{nb_path.name}", pages, repo, ref)
                cell["source"] = text.splitlines(keepends=True)
        first = "".join(nb["cells"][0]["source"])
        link = colab_link(repo, ref, nb_path.name) if repo else None
        nb["cells"][0]["source"] = with_open_line(first, link).splitlines(keepends=True)
        write_text(src / "notebooks" / nb_path.name, json.dumps(nb, indent=1, ensure_ascii=False))
    for d in DOCS:
        text = (ROOT / "docs" / f"{d}.md").read_text(encoding="utf-8")
        write_text(src / "docs" / f"{d}.md", relink(text, f"docs/{d}.md", pages, repo, ref))
    write_text(src / "DESIGN.md", relink((ROOT / "DESIGN.md").read_text(encoding="utf-8"), "DESIGN.md", pages,
                                         repo, ref))
    readme = relink((ROOT / "README.md").read_text(encoding="utf-8"), "index.md", pages, repo, ref)
    trees = "\n".join(f"```{{toctree}}\n:hidden:\n:caption: {cap}\n:glob:\n\n" + "\n".join(items) + "\n```\n"
                      for cap, items in TOCTREES)
    write_text(src / "index.md", readme + "\n" + trees)
    for name, recs in records.items():
        write_text(src / "measured" / f"{name}.md", experiment_page(name, recs, img))
    table = report.readme_table()
    for name in records:  # each experiment in the table links to its page
        table = table.replace(f"| `{name}` |", f"| [`{name}`]({name}.md) |")
    write_text(src / "measured" / "index.md", "# Measured results\n\nEvery experiment's newest reference record, "
               "with the machine that measured it; each page answers what a technique costs, what it keeps and "
               "how fast it runs, one table per question and model.\n\n" + table
               + "\n```{toctree}\n:hidden:\n\n" + "\n".join(records) + "\n```\n")
    write_text(src / "api.md", "# API reference\n\nGenerated from the docstrings of the `labkit` package.\n\n"
               "```{eval-rst}\n.. autosummary::\n   :toctree: generated\n   :recursive:\n\n   labkit\n```\n")
    theme = {"home_page_in_toc": True, "show_toc_level": 2, "use_download_button": False}
    if repo:
        theme |= {"repository_url": f"https://github.com/{repo}", "use_repository_button": True,
                  "repository_branch": ref}
    skip = [f"notebooks/{p.name}" for p in notebooks if p.name not in run]
    (src / "_static").mkdir()
    write_text(src / "_static" / "labkit.css", CSS)
    write_text(src / "favicon.svg", FAVICON)  # else browsers ask for /favicon.ico and log a 404
    # The docstrings are plain prose, not reStructuredText (`|w|`, `*args`): only severe docutils messages count.
    write_text(src / "docutils.conf", "[general]\nreport_level: 4\n")
    write_text(src / "conf.py", CONF.format(theme=theme, mode="cache" if execute else "off",
                                            cache=str(cache or src.parent / "jupyter_cache"), skip=skip))
    return src


def build(out: Path | str, *, repo: str | None = None, ref: str = "main", lessons: list[str] | None = None,
          execute: bool = True) -> Path:
    """Stage and build the site into ``out/html`` (returned); lessons run in quick mode (``LABKIT_QUICK=1``)."""
    try:
        import myst_nb  # noqa: F401
        import sphinx_book_theme  # noqa: F401
    except ImportError as e:
        raise LabkitError(f"the site needs Sphinx, myst-nb and sphinx-book-theme ({e.name} is missing): "
                          "pip install 'labkit-inference[site]' (make site installs them)") from e
    out = Path(out).resolve()
    src = stage(out / "src", repo=repo, ref=ref, lessons=lessons, execute=execute, cache=out / "jupyter_cache")
    tmp = out / "html.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "LABKIT_QUICK": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-d", str(out / "doctrees"), str(src), str(tmp)]
    proc = subprocess.run(cmd, env=env, cwd=src)
    if proc.returncode:
        raise LabkitError(f"sphinx-build failed (exit {proc.returncode}); its messages are above")
    final = out / "html"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the site appears whole or not at all
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", nargs="?", default="site", help="folder for the build (default: site)")
    parser.add_argument("--repo", help="GitHub OWNER/REPO: Colab deep links and source links (default: none)")
    parser.add_argument("--ref", default="main", help="branch, tag or commit for those links (default: main)")
    parser.add_argument("--lessons", help="comma-separated lesson ids to execute, e.g. 00,05 (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="render the lessons without running them")


def run(args: argparse.Namespace) -> Path:
    lessons = [s.strip() for s in args.lessons.split(",") if s.strip()] if args.lessons else None
    html_dir = build(args.out, repo=args.repo, ref=args.ref, lessons=lessons, execute=not args.no_execute)
    print(f"site: {html_dir / 'index.html'}")
    return html_dir
