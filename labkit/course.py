"""The course bundle an instructor hands out, and the setup cell that installs the kit from it.

``labkit course build DIR --wheel WHEEL [--repo OWNER/REPO --ref REF]`` (``make course``) writes one folder: the
wheel, every notebook, and ``START_HERE.md`` (what to open first, how long each lesson takes, what each needs),
all read from the notebooks themselves. With ``--repo`` each notebook gets a real "Open in Colab" deep link; without
one it gets no badge at all (a link that goes nowhere is worse than none).

The kit's name on PyPI and in its wheels is :data:`DISTRIBUTION`; it imports as ``labkit``. PyPI's ``labkit`` is an
unrelated 2015 package, so the setup cell checks which distribution it installed before importing anything.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from labkit import LabkitError, __version__
from labkit.atomic import atomic
from labkit.atomic import write_text as atomic_write_text

DISTRIBUTION = "labkit-inference"
WHEEL_PREFIX = DISTRIBUTION.replace("-", "_")  # wheel file names normalise '-' to '_'
COURSE_FOLDER = "labkit-course"  # the bundle's default name; the setup cell looks for it on Google Drive
_REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")
_REF = re.compile(r"[A-Za-z0-9._/-]{1,200}")
COLAB_LINE = "On Colab:"  # the line of each notebook's first cell that a course build puts the badge on
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

SETUP_CELL = r'''# Setup (the same in every notebook). Uses the kit if it is installed; else installs it, keeping this runtime's
# torch, from the newest labkit_inference-*.whl found: beside this notebook, in /content (Colab's Files pane), or in
# a course folder named labkit-course* on your Google Drive (Colab asks to mount Drive only when nothing else is
# found); else from LABKIT_SOURCE, a wheel URL or git URL your course gives you. The kit is `labkit-inference` on
# PyPI and imports as `labkit`: PyPI's `labkit` is an unrelated package, and this cell refuses it.
import glob, importlib, importlib.metadata as md, importlib.util, os, re, subprocess, sys
KIT = "labkit-inference"
def _version(path):  # newest by version, not by name: 0.10.0 is newer than 0.9.0
    m = re.match(r"labkit_inference-(\d+(?:\.\d+)*)", os.path.basename(path))
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()
def _installed():  # {distribution: version} of this runtime
    return {(d.metadata["Name"] or "").lower(): d.version for d in md.distributions()}
def _who_provides_labkit():
    return ", ".join(f"{d} {md.version(d)}" for d in md.packages_distributions().get("labkit", [])) or "nothing"
def _pip(*args):
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    return r.returncode == 0, (r.stderr or r.stdout).strip()[-800:]
if KIT not in _installed() and importlib.util.find_spec("labkit") is not None:
    raise RuntimeError(f"this runtime's `labkit` comes from {_who_provides_labkit()}, not {KIT}: "
                       "run `pip uninstall -y labkit`, restart the runtime and run this cell again")
if KIT not in _installed():
    mount = os.environ.get("LABKIT_DRIVE_MOUNT", "/content/drive")  # where Colab mounts Google Drive
    drive = f"{mount}/MyDrive"
    patterns = ["labkit_inference-*.whl", "/content/labkit_inference-*.whl",
                f"{drive}/labkit-course*/labkit_inference-*.whl", f"{drive}/*/labkit-course*/labkit_inference-*.whl"]
    wheels = sorted({w for p in patterns for w in glob.glob(p)}, key=_version)
    if not wheels and not os.environ.get("LABKIT_SOURCE") and "google.colab" in sys.modules \
            and not os.path.isdir(drive):
        print("no wheel beside this notebook or in /content: mounting Google Drive to look for a labkit-course folder")
        from google.colab import drive as _drive
        _drive.mount(mount)
        wheels = sorted({w for p in patterns for w in glob.glob(p)}, key=_version)
    if wheels:
        print(f"found {len(wheels)} wheel(s) of the kit; the newest: {wheels[-1]}")
    spec = f"{KIT}[quant] @ file://{os.path.abspath(wheels[-1])}" if wheels else os.environ.get("LABKIT_SOURCE", "")
    if not spec:
        raise RuntimeError(
            "the kit is not installed here and no labkit_inference-*.whl was found beside this notebook, in /content "
            f"or in {drive}/labkit-course*/ (or one folder deeper). Upload the wheel your instructor built with "
            "`make course` (Colab: Files pane), add the shared labkit-course folder to your Drive, or set "
            "LABKIT_SOURCE (os.environ['LABKIT_SOURCE'] = '<the wheel or git URL your course gives>'); then run "
            "this cell again.")
    before = _installed()
    print("installing", spec)
    ok, said = _pip("install", "-q", spec)
    importlib.invalidate_caches()
    if not ok:
        raise RuntimeError(f"pip could not install {spec}:\n{said}")
    after = _installed()
    want = _version(wheels[-1]) if wheels else None
    if KIT not in after or (want and tuple(int(x) for x in re.findall(r"\d+", after[KIT])[:len(want)]) != want):
        raise RuntimeError(f"{spec} did not install {KIT}" + (f" {'.'.join(map(str, want))}" if want else "")
                           + f": `labkit` now comes from {_who_provides_labkit()}. That is not this kit: run "
                           "`pip uninstall -y labkit`, and point LABKIT_SOURCE at the kit's wheel or git URL.")
    changed = [d for d in sorted(before) if d in after and after[d] != before[d]]
    if changed:
        print("pip changed this runtime's", "; ".join(f"{d} {before[d]} → {after[d]}" for d in changed))
        if any(d.replace("-", "_") in sys.modules for d in changed):
            print("some of those were already imported: Runtime → Restart session, then run this cell again")
    import torch
    if torch.cuda.is_available() and "onnxruntime" in after:  # the GPU build must be alone: beside `onnxruntime`
        print("GPU runtime: replacing onnxruntime by onnxruntime-gpu")  # its CUDA provider goes unseen
        _pip("uninstall", "-q", "-y", "onnxruntime")
        ok, said = _pip("install", "-q", "onnxruntime-gpu")
        if not ok:
            _pip("install", "-q", f"onnxruntime=={after['onnxruntime']}")
            print(f"could not install onnxruntime-gpu, so ONNX Runtime stays on the CPU here (pip said: {said})")
    importlib.invalidate_caches()
import labkit
from labkit import env
DEVICE = env.default_device()  # every model this notebook loads by hand goes here
QUICK = env.quick_mode()  # quick by default everywhere; LABKIT_QUICK=0 asks for the full sizes
print(f"labkit {labkit.__version__} ({KIT}) · device {DEVICE} · quick mode {QUICK} · {env.bf16_note(DEVICE)}")'''

OPEN_LINE = (f"{COLAB_LINE} open this notebook from your course's folder or link, pick *Runtime → Change runtime "
             "type → GPU*, and run the cells top to bottom; the setup cell installs the kit from the course's wheel.")


def colab_link(repo: str, ref: str, notebook: str) -> str:
    """The deep link that opens ``notebooks/<notebook>`` of GitHub repository ``repo`` at ``ref`` in Colab."""
    if not _REPO.fullmatch(repo or ""):
        raise LabkitError(f"repo={repo!r} is not a GitHub repository; give it as OWNER/REPO")
    if not _REF.fullmatch(ref or "") or ".." in ref:
        raise LabkitError(f"ref={ref!r} is not a branch, tag or commit; give e.g. main or v0.1.0")
    return f"https://colab.research.google.com/github/{repo}/blob/{ref}/notebooks/{notebook}"


def with_open_line(markdown: str, link: str | None) -> str:
    """``markdown`` (a notebook's first cell) with its "On Colab:" line carrying a badge to ``link``, or none."""
    badge = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)(?: — )?", re.M)
    text = badge.sub("", markdown)
    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith(COLAB_LINE)), None)
    if at is None:
        raise LabkitError(f"the notebook's first cell has no line starting {COLAB_LINE!r} to put the Colab link on")
    lines[at] = OPEN_LINE if link is None else f"[![Open In Colab]({BADGE_IMAGE})]({link}) — {OPEN_LINE}"
    return "\n".join(lines)


def spoken(seconds: float) -> str:
    """'about 40 seconds', 'about 1.5 minutes': rounded the way the lesson says it."""
    if seconds < 55:
        return f"{max(10, 5 * round(seconds / 5))} seconds"
    minutes = round(seconds / 30) / 2
    return f"{minutes:g} minute{'s' if minutes != 1 else ''}"


def parse_spoken(text: str) -> float:
    """Seconds from a Time line's 'about N seconds' / 'about N minutes'."""
    m = re.search(r"about ([\d.]+) (second|minute)s?", text)
    if not m:
        raise ValueError(f"no 'about N seconds/minutes' in {text!r}")
    return float(m.group(1)) * (60 if m.group(2) == "minute" else 1)


def lesson_facts(markdown: str) -> dict[str, str]:
    """Title, time and needs as a notebook's first cell states them (TEACHING.md's top cell)."""
    title = next((ln.lstrip("# ").strip() for ln in markdown.splitlines() if ln.startswith("# ")), "")

    def field(name: str) -> str:
        m = re.search(rf"\*\*{name}\*\*:\s*(.+?)(?=\s*\*\*[^*\n]+\*\*:|\n\n|$)", markdown, re.S)
        return " ".join(m.group(1).split()) if m else "not stated"

    return {"title": title, "time": field("Time"), "needs": field("Needs")}


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def start_here(notebooks: list[Path], wheel_name: str) -> str:
    """The bundle's START_HERE.md, read from the notebooks' own top cells."""
    rows = []
    for path in notebooks:
        facts = lesson_facts(_source(json.loads(path.read_text())["cells"][0]))
        rows.append(f"| `{path.name}` | {facts['title']} | {facts['time']} | {facts['needs']} |")
    return "\n".join([
        f"# labkit course ({DISTRIBUTION} {__version__})", "",
        f"Open `{notebooks[0].name}` first: it checks the runtime, installs the kit and sets the baseline every "
        "later lesson compares against. Then take the lessons in order; each runs on its own.", "",
        "## Getting the kit into a runtime", "",
        f"- **Google Drive + Colab**: add this folder to your Drive (keep its name starting `{COURSE_FOLDER}`, at the "
        "top of *My Drive* or one folder down), open a notebook from it with Colab. The setup cell mounts Drive "
        "(Colab asks once) and installs the wheel from here, so a new runtime needs no upload.",
        f"- **Upload**: upload `{wheel_name}` in Colab's Files pane (or keep it beside the notebooks in Jupyter) and "
        "run the setup cell.",
        "- **A URL**: set `LABKIT_SOURCE` to the wheel URL or git URL your course gives, then run the setup cell.",
        "",
        "Every lesson runs in quick mode by default (sizes that fit a free runtime in minutes); set "
        "`LABKIT_QUICK=0` before the setup cell for the full sizes.", "",
        "## The lessons", "",
        "| notebook | lesson | time | needs |", "|---|---|---|---|", *rows, "",
        "## Course map and agendas", "", course_map(notebooks[0].parent), "",
    ])


# what a lesson builds on (the lesson ids: a notebook's name up to its first "_")
PREREQUISITES = {"00": (), "01a": ("00",), "01b": ("01a",), "01c": ("01b",), "01d": ("01c",), "02": ("00",),
                 "03": ("00",), "04": ("00",), "05": ("04",), "06a": ("00",), "06b": ("06a",), "06c": ("06b",),
                 "07": ("01d", "02", "03", "04", "06b")}
SESSION_LIMIT_MIN = 60  # no lesson longer than one session (tests/test_lessons.py)
ONE_DAY = ("00", "01a", "01b", "01c", "01d", "06a", "06b")  # quantization and serving: the article's two headline claims
DAY = ("09:00", "17:00")
BREAK_MIN, LUNCH_MIN = 15, 60


def lesson_id(notebook: str | Path) -> str:
    """``"01a"`` for ``01a_quantization_by_hand.ipynb``."""
    return Path(notebook).stem.split("_")[0]


def lesson_minutes(nb: dict, run_seconds: float) -> float:
    """How long a lesson takes in a session, by one explicit rule: prose words / 100 (technical reading) +
    non-comment code lines / 10 + 10 per exercise check + the quick-mode run time."""
    words = code = checks = 0
    for cell in nb["cells"]:
        src = _source(cell)
        if cell["cell_type"] == "markdown":
            words += len(src.split())
        elif cell["cell_type"] == "code":
            code += sum(1 for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#"))
            checks += src.count("exercises.check(")
    return words / 100 + code / 10 + 10 * checks + run_seconds / 60


def lessons(notebooks_dir: Path | str) -> list[dict]:
    """Every lesson: id, notebook, title, minutes (the rule above, run time from the notebook's own Time line),
    exercises and prerequisites."""
    from labkit import exercises

    out = []
    for path in sorted(Path(notebooks_dir).glob("*.ipynb")):
        nb = json.loads(path.read_text())
        facts = lesson_facts(_source(nb["cells"][0]))
        lid = lesson_id(path)
        out.append({"id": lid, "notebook": path.name, "title": facts["title"].split(" · ", 1)[-1],
                    "minutes": round(lesson_minutes(nb, parse_spoken(facts["time"]))),
                    "exercises": exercises.available(lid), "prerequisites": PREREQUISITES.get(lid, ())})
    return out


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def agenda(rows: list[dict], ids: tuple[str, ...] | None = None, days: int = 1) -> list[list[tuple[str, str]]]:
    """Lessons in order, one session each, from 09:00 with a break after each and lunch at the first break past
    noon; a day ends by 17:00 and the next lesson starts the next day. Returns each day's (time, what) rows."""
    start, end = (int(h) * 60 + int(m) for h, m in (s.split(":") for s in DAY))
    todo = [r for r in rows if ids is None or r["id"] in ids]
    schedule: list[list[tuple[str, str]]] = []
    while todo and len(schedule) < days:
        now, lunch, day = start, False, []
        while todo and now + todo[0]["minutes"] <= end:
            r = todo.pop(0)
            day.append((f"{_clock(now)}–{_clock(now + r['minutes'])}", f"{r['id']} · {r['title']}"))
            now += r["minutes"]
            pause = LUNCH_MIN if not lunch and now >= 12 * 60 else BREAK_MIN
            lunch = lunch or pause == LUNCH_MIN
            if todo and now + pause + todo[0]["minutes"] <= end:
                day.append((f"{_clock(now)}–{_clock(now + pause)}", "lunch" if pause == LUNCH_MIN else "break"))
            now += pause
        schedule.append(day)
    if todo:
        raise LabkitError(f"{', '.join(r['id'] for r in todo)} do not fit {days} day(s) of {DAY[0]}–{DAY[1]}")
    return schedule


def course_map(notebooks_dir: Path | str) -> str:
    """The course map (every lesson, its minutes, prerequisites and exercises) and a one- and a two-day agenda, as
    ``docs/course.md`` (each notebook linked relative to that page: on GitHub and on the course website alike)."""
    rows = lessons(notebooks_dir)
    out = ["| lesson | notebook | minutes | builds on | you write |", "|---|---|---:|---|---|"]
    for r in rows:
        out.append(f"| {r['id']} · {r['title']} | [{r['notebook']}](../notebooks/{r['notebook']}) | {r['minutes']} | "
                   f"{', '.join(r['prerequisites']) or '—'} | {', '.join(f'`{e}`' for e in r['exercises'])} |")
    out += ["", f"Minutes = prose words / 100 + code lines / 10 + 10 per exercise + the quick-mode run time "
                f"(`labkit.course.lesson_minutes`); every lesson fits a {SESSION_LIMIT_MIN}-minute session.", ""]
    for title, ids, days in ((f"One day: {', '.join(ONE_DAY)} (quantization and serving)", ONE_DAY, 1),
                             ("Two days: every lesson", None, 2)):
        out += [f"### {title}", ""]
        for d, day in enumerate(agenda(rows, ids, days), start=1):
            out += ([f"Day {d}:", ""] if days > 1 else []) + ["| time | |", "|---|---|"]
            out += [f"| {when} | {what} |" for when, what in day] + [""]
    return "\n".join(out)


COURSE_PAGE_HEAD = """# The course map

Every lesson with the time it takes in a session, what it builds on and what the learner writes, and two workshop
agendas built from those times. Generated from the notebooks by `make readme` (a test keeps this page equal to them).

"""


def write_course_page(path: Path | str = "docs/course.md", notebooks_dir: Path | str = "notebooks") -> bool:
    """Write the course map page; True when it changed."""
    path, text = Path(path), COURSE_PAGE_HEAD + course_map(notebooks_dir)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


def build(out: Path | str, wheel: Path | str, notebooks_dir: Path | str, *, repo: str | None = None,
          ref: str | None = None) -> Path:
    """Write the course bundle to ``out`` (replaced whole, via a temporary folder) and return its path."""
    out, wheel, notebooks_dir = Path(out), Path(wheel), Path(notebooks_dir)
    if not wheel.is_file() or not wheel.name.startswith(WHEEL_PREFIX + "-") or wheel.suffix != ".whl":
        raise LabkitError(f"wheel={str(wheel)!r} is not a {WHEEL_PREFIX}-*.whl file; build one with `make dist`")
    notebooks = sorted(notebooks_dir.glob("*.ipynb"))
    if not notebooks:
        raise LabkitError(f"notebooks_dir={str(notebooks_dir)!r} holds no .ipynb files")
    if (repo is None) != (ref is None):
        raise LabkitError(f"repo={repo!r}, ref={ref!r}: give both (for Colab deep links) or neither (no badges)")
    with atomic(out, directory=True) as tmp:
        shutil.copy2(wheel, tmp / wheel.name)
        for path in notebooks:
            nb = json.loads(path.read_text())
            link = colab_link(repo, ref, path.name) if repo else None
            nb["cells"][0]["source"] = with_open_line(_source(nb["cells"][0]), link)
            (tmp / path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        (tmp / "START_HERE.md").write_text(start_here(notebooks, wheel.name))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``labkit course build DIR``'s arguments (also ``python -m labkit.course``, which needs no torch)."""
    parser.add_argument("action", choices=["build"])
    parser.add_argument("dir", type=Path, help="the bundle folder to write (replaced whole)")
    parser.add_argument("--wheel", type=Path, default=None, help="the kit's wheel (default: the newest in dist/)")
    parser.add_argument("--notebooks", type=Path, default=Path("notebooks"), help="the notebooks (default: notebooks/)")
    parser.add_argument("--repo", default=None, help="OWNER/REPO on GitHub: each notebook gets an Open-in-Colab link")
    parser.add_argument("--ref", default=None, help="the branch, tag or commit those links open (with --repo)")


def run(args: argparse.Namespace) -> Path:
    wheel = args.wheel
    if wheel is None:
        found = sorted(Path("dist").glob(f"{WHEEL_PREFIX}-*.whl"))
        if not found:
            raise LabkitError(f"--wheel not given and dist/ holds no {WHEEL_PREFIX}-*.whl: run `make dist`")
        wheel = found[-1]
    out = build(args.dir, wheel, args.notebooks, repo=args.repo, ref=args.ref)
    print(f"wrote {out}: {wheel.name}, {len(list(out.glob('*.ipynb')))} notebooks, START_HERE.md"
          + (f"; Colab links open {args.repo} at {args.ref}" if args.repo else "; no Colab badges (no --repo)"))
    return out


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m labkit.course", description=__doc__)
    add_arguments(_parser)
    try:
        run(_parser.parse_args())
    except LabkitError as exc:
        print(f"labkit course: error: {exc}", file=sys.stderr)
        sys.exit(2)
