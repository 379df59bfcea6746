"""The course website, built by Sphinx + myst-nb from this checkout and read in headless Chromium.

``make test`` builds it with lesson 00 executed and the other lessons rendered without running (``make site`` runs
them all; executing every lesson twice would double make test). ``LABKIT_SITE=site/html`` points these tests at a
site ``make site`` built instead: then every lesson page must show executed outputs."""

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from labkit import site
from labkit.results import load_reference
from tests.conftest import ARTIFACTS

LESSON = "00_setup_and_baselines"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    given = os.environ.get("LABKIT_SITE")
    if given:
        return Path(given).resolve()
    pytest.importorskip("myst_nb", reason="myst-nb is not installed (make test installs the dev extra)")
    pytest.importorskip("sphinx_book_theme", reason="sphinx-book-theme is not installed (the dev extra has it)")
    return site.build(tmp_path_factory.mktemp("site"), lessons=["00"])


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) and not (tag == "link" and a.get("rel") == "preload"):
                self.links.append(a[key])


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _pages(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def test_every_internal_link_and_anchor_resolves(built):
    parsed = {p: _parse(p) for p in _pages(built)}
    broken = []
    for page, doc in parsed.items():
        for link in doc.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("//", "mailto:", "javascript:")):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(built)} -> {link}")
            elif parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(built)} -> {link} (no such anchor)")
    assert not broken, broken[:20]


def test_the_site_holds_lessons_results_guides_and_api(built):
    names = {p.relative_to(built).as_posix() for p in _pages(built)}
    lessons = {Path(p).stem for p in (site.ROOT / "notebooks").glob("*.ipynb")}
    assert {f"notebooks/{n}.html" for n in lessons} <= names
    assert {"index.html", "docs/course.html", "docs/instructors.html", "api.html", "measured/index.html",
            "measured/quantization.html", "search.html"} <= names
    assert any(n.startswith("generated/labkit.quant.primitives") for n in names)  # the API, from docstrings
    text = (built / "generated" / "labkit.quant.primitives.html").read_text(encoding="utf-8")
    assert "quantize_asymmetric" in text


def test_results_pages_answer_questions_one_model_a_table(built):
    page = (built / "measured" / "quantization.html").read_text(encoding="utf-8")
    for question in ("What does it cost?", "What does it keep?", "How fast is it?"):
        assert question in page
    assert "The full record" in page and "<details>" in page
    rec, _ = load_reference("quantization", "cpu-epyc-2core")
    fp32 = rec.variant("fp32", "smollm2-135m")
    assert f"{fp32['perplexity']:,.4g}" in page  # the record's value, in the table


def test_no_launch_link_without_a_repository_and_a_real_one_with(built, tmp_path):
    assert "colab.research.google.com" not in (built / "notebooks" / f"{LESSON}.html").read_text(encoding="utf-8")
    src = site.stage(tmp_path / "src", repo="example-org/labkit", ref="v0.1.0", execute=False)
    first = "".join(json.loads((src / "notebooks" / f"{LESSON}.ipynb").read_text())["cells"][0]["source"])
    assert f"https://colab.research.google.com/github/example-org/labkit/blob/v0.1.0/notebooks/{LESSON}.ipynb" in first
    conf = (src / "conf.py").read_text()
    assert "https://github.com/example-org/labkit" in conf


def test_restaging_keeps_the_execution_cache(built, tmp_path):
    """A rebuild re-runs only what changed: a freshly staged lesson (even with Colab links) matches the cached
    execution of the build above."""
    if os.environ.get("LABKIT_SITE"):
        pytest.skip("checks the cache of the build this module made")
    from jupyter_cache import get_cache

    cache = get_cache(built.parent / "jupyter_cache")
    src = site.stage(tmp_path / "src", repo="example-org/labkit", execute=False)
    assert cache.match_cache_file(src / "notebooks" / f"{LESSON}.ipynb")  # raises KeyError when not cached


def test_bad_lesson_ids_are_named():
    with pytest.raises(ValueError, match=r"lessons='00,9z': no lesson 9z; the lessons are 00, 01a"):
        site.lesson_notebooks(site.ROOT / "notebooks", ["00", "9z"])


def test_relink_keeps_site_pages_and_never_leaves_a_dead_link():
    pages = {"docs/usage.md", "DESIGN.md"}
    md = "[guide](usage.md#x) [design](../DESIGN.md) [code](../labkit/quant/primitives.py) [web](https://a.b/c)"
    assert site.relink(md, "docs/instructors.md", pages, None, "main") == (
        "[guide](usage.md#x) [design](../DESIGN.md) code [web](https://a.b/c)")
    assert "[code](https://github.com/o/r/blob/main/labkit/quant/primitives.py)" in site.relink(
        md, "docs/instructors.md", pages, "o/r", "main")




@pytest.fixture(scope="module")
def served(built):
    """The site over HTTP on loopback, as readers get it (the search page fetches pages, which file:// forbids)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(built)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"{url}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"{url}: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"{url}: failed to load {r.url}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, errors


def test_every_page_loads_without_console_errors_and_every_image_decodes(browser, built, served):
    errors, blank = [], []
    for path in _pages(built):
        page, errs = _open(browser, f"{served}/{path.relative_to(built).as_posix()}")
        widths = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
        blank += [f"{path.relative_to(built)}: {src}" for src, w in widths if w == 0]
        errors += errs
        page.close()
    assert not errors, errors[:10]
    assert not blank, blank[:10]


def test_lesson_pages_show_their_executed_outputs(browser, built, served):
    base, hw = load_reference("baseline")
    llm = base.variant("fp32", "smollm2-135m")
    executed = ([p.stem for p in (site.ROOT / "notebooks").glob("*.ipynb")] if os.environ.get("LABKIT_SITE")
                else [LESSON])
    for stem in executed:
        page, errors = _open(browser, f"{served}/notebooks/{stem}.html")
        assert page.locator(".cell_output").count() > 0, f"{stem} shows no executed output"
        if stem == LESSON:
            text = page.inner_text("article")
            assert f"reference record ({hw}, not run here)" in text
            assert f"perplexity {llm['perplexity']:.2f}" in text  # the reference record's value, printed by the lesson
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "site-lesson-00.png"), full_page=False)
        assert not errors, errors
        page.close()


def test_search_finds_a_lesson_by_a_word_from_it(browser, served):
    page, errors = _open(browser, f"{served}/search.html?q=paging")
    page.wait_for_selector("#search-results ul.search li a", timeout=30_000)
    hrefs = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
    assert any(re.search(r"notebooks/06a_kv_cache_and_paging\.html", h) for h in hrefs), hrefs
    assert not errors, errors
    page.close()
