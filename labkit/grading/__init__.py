"""Grade a cohort's notebooks (``labkit grade SUBMISSIONS [--out DIR]``).

Each submission runs on its own — a fresh temporary directory, a fresh kernel, quick mode, a limit on every cell,
on the whole notebook and on memory (:mod:`labkit.grading.worker`, confined by :mod:`labkit.grading.guard`) —
and every ``exercises.check`` it makes is a grade. A notebook that raises, hangs, runs out of memory or reaches
outside its directory costs its own row only, which says what happened. Written to ``--out``: ``grades.csv`` (one
row per learner, one column per exercise, the total), ``grades.json``, ``feedback/<learner>.html``, and with
``gradescope=True`` one Gradescope ``results.json`` per learner (:func:`gradescope_results`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from labkit import LabkitError, atomic, exercises, zoo

NOT_ATTEMPTED = "not attempted (no exercises.check of it ran)"


class Check(BaseModel):
    """One exercise check as the grade log carries it. The log lies in the learner's directory, so every entry is
    validated: a malformed one (a string for points, points above the maximum, a missing message, a maximum other
    than the kit's) is dropped and said in that learner's row; it never reaches the cohort's files."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    ok: bool
    points: float = Field(ge=0)
    max_points: float = Field(gt=0)
    message: str
    cell: int | None = None

    @model_validator(mode="after")
    def _points_within_the_maximum(self) -> Check:
        if self.points > self.max_points:
            raise ValueError(f"points {self.points} above max_points {self.max_points}")
        if self.max_points != MAX_POINTS:
            raise ValueError(f"max_points {self.max_points}: every exercise is worth {MAX_POINTS}")
        return self


MAX_POINTS = 1.0  # what exercises.verify gives a fully right function


def _valid_checks(entries: list, sub: Submission) -> None:
    """Keep the first valid check of each exercise in ``sub``; every malformed entry becomes an error line."""
    for entry in entries:
        try:
            check = Check.model_validate(entry)
        except ValidationError as exc:
            what = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            cell = entry.get("cell") if isinstance(entry, dict) and isinstance(entry.get("cell"), int) else None
            sub.errors.append({"cell": cell, "error": f"a malformed grade-log entry was ignored ({what[:300]})"})
            continue
        sub.exercises.setdefault(check.name, check.model_dump())  # the first check of an exercise counts


@dataclass
class Submission:
    """One learner's row: every exercise's points and message, and what happened to the notebook."""

    learner: str
    path: str
    status: str = "ran to the end"
    exercises: dict[str, dict] = field(default_factory=dict)  # name -> points, max_points, message, cell
    errors: list[dict] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(e["points"] for e in self.exercises.values())


def _learners(paths: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[Submission]]:
    """(learner name, notebook) for every file, a directory's ``*.ipynb`` included; duplicates and files that are
    not notebooks become rows with their reason."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.ipynb"))
            if not found:
                raise LabkitError(f"submissions directory {str(p)!r} holds no .ipynb file")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise LabkitError(f"submission {str(p)!r} does not exist")
    import nbformat

    ok, bad, names = [], [], set()
    for f in files:
        name = f.stem
        if name in names:
            bad.append(Submission(name, str(f), f"duplicate learner name {name!r}: only the first such file is graded"))
            continue
        names.add(name)
        try:
            nbformat.validate(nbformat.read(f, as_version=4))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is that learner's problem only
            bad.append(Submission(name, str(f), f"not a notebook: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        ok.append((name, f))
    return ok, bad


def _limits(memory_mb: int):
    def apply() -> None:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_one(learner: str, notebook: Path, *, forbidden: Sequence[Path], cell_timeout: float,
            notebook_timeout: float, memory_mb: int, cache: Path | None = None) -> Submission:
    """Run one notebook in a fresh temporary directory and read back its checks. ``cache``: the kit's model cache
    the kernel reads (it may not write there); by default the grader's own."""
    sub = Submission(learner, str(notebook))
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        work, result = Path(tmp) / "work", Path(tmp) / "result.json"
        work.mkdir()
        shutil.copyfile(notebook, work / "submission.ipynb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_GRADE", "JUPYTER", "IPYTHON"))}
        env.update(
            LABKIT_QUICK="1",
            LABKIT_GRADE_LOG=str(work / ".labkit-grade-log.jsonl"),
            HOME=str(work),
            TMPDIR=str(work),
            MPLCONFIGDIR=str(work / ".matplotlib"),
            XDG_CACHE_HOME=str(work / ".cache"),
            IPYTHONDIR=str(work / ".ipython"),
            JUPYTER_RUNTIME_DIR=str(work / ".jupyter"),
            HF_HUB_OFFLINE="1",
            LABKIT_CACHE=str(cache or zoo.cache_dir()),
            LABKIT_GRADE_FORBIDDEN=json.dumps([str(p) for p in forbidden]),
        )
        cmd = [sys.executable, "-m", "labkit.grading.worker", "submission.ipynb", str(result), str(cell_timeout)]
        err_path = Path(tmp) / "worker.err"  # a file, not a pipe: a kernel writing megabytes to fd 2 costs disk only
        with open(err_path, "wb") as err_file:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=err_file,
                                    preexec_fn=_limits(memory_mb), start_new_session=True)
        try:
            proc.wait(timeout=notebook_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and its kernel
            proc.wait()
            sub.status = f"the notebook ran past {notebook_timeout:g} s and was stopped"
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a kernel left behind
            except ProcessLookupError:
                pass
        if result.exists():
            out = json.loads(result.read_text(encoding="utf-8"))
            if sub.status == Submission.status:
                sub.status = out["status"]
            sub.errors = out["errors"]
            _valid_checks(out["checks"], sub)
        elif sub.status == Submission.status:
            with open(err_path, "rb") as f:
                f.seek(max(err_path.stat().st_size - 300, 0))
                sub.status = f"the grader's worker failed: {f.read().decode(errors='replace')}"
    return sub


def grade(submissions: Sequence[str | Path], out: str | Path | None = None, *, lesson: str | None = None,
          cell_timeout: float = 120.0, notebook_timeout: float = 900.0, memory_mb: int = 8192,
          gradescope: bool = False, progress: bool = True, jobs: int | None = None) -> list[Submission]:
    """Grade every submission (files or directories of ``.ipynb``); write the cohort's files to ``out``.

    ``jobs`` notebooks run at once (default: the machine's cores), each in its own process with its own limits; the
    grades do not depend on it (each submission is graded alone, and the rows are sorted by learner).

    ``lesson`` ("01", ...) names the notebook whose exercises are graded; by default, those of every lesson any
    learner checked an exercise of. An exercise a learner never checked scores 0, "not attempted".
    """
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if not (isinstance(jobs, int) and jobs >= 1):
        raise LabkitError(f"jobs={jobs!r} must be a whole number of at least 1 (notebooks graded at once)")
    for name, value, low in (("cell_timeout", cell_timeout, 1), ("notebook_timeout", notebook_timeout, 1),
                             ("memory_mb", memory_mb, 512)):
        if not value >= low:
            raise LabkitError(f"{name}={value!r} must be at least {low}")
    if lesson is not None:
        exercises.of_lesson(lesson)
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as exc:
        raise LabkitError(f"labkit grade needs {exc.name}: pip install 'labkit-inference[grade]'") from exc
    paths = [Path(p) for p in submissions]
    if not paths:
        raise LabkitError("submissions is empty: pass notebooks or directories of them")
    todo, rows = _learners(paths)
    if todo:
        zoo.fetch(progress=progress)  # the kernels read the models from the grader's cache: writing it is refused
    cache = zoo.cache_dir()
    forbidden = sorted({p.resolve().parent for _, p in todo} | set(exercises.solution_files()))
    bar = tqdm(total=len(todo), desc="grading", unit="notebook", disable=not progress)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads wait; each notebook runs in its own process
        pending = [pool.submit(run_one, learner, path, forbidden=forbidden, cell_timeout=cell_timeout,
                               notebook_timeout=notebook_timeout, memory_mb=memory_mb, cache=cache)
                   for learner, path in todo]
        for done in as_completed(pending):
            bar.set_postfix_str(done.result().learner)
            bar.update(1)
    bar.close()
    rows += [p.result() for p in pending]
    known = exercises.available()
    checked = {exercises.notebook_of(e) for r in rows for e in r.exercises if e in known}
    names = exercises.available(lesson) if lesson else [n for n in known if exercises.notebook_of(n) in checked]
    for row in rows:
        unknown = sorted(set(row.exercises) - set(known))
        for name in unknown:
            row.errors.append({"cell": row.exercises.pop(name).get("cell"), "error": f"unknown exercise {name!r}"})
        row.exercises = {n: row.exercises.get(n) or {"name": n, "ok": False, "points": 0.0, "max_points": 1.0,
                                                      "message": NOT_ATTEMPTED, "cell": None}
                         for n in names}
    rows.sort(key=lambda r: r.learner)
    if out is not None:
        write(rows, Path(out), gradescope=gradescope)
    return rows


GRADESCOPE_VISIBILITY = ("visible", "hidden", "after_due_date", "after_published")


def gradescope_results(row: Submission) -> dict:
    """Gradescope's ``results.json`` for one learner: a test per exercise with ``name``, ``number``, ``score``,
    ``max_score``, ``output`` and ``visibility`` (the fields Gradescope's own ``gradescope_utils`` JSONTestRunner
    writes), the total as ``score``, and what happened to the notebook as ``output``."""
    tests = [{"name": name, "number": str(i + 1), "score": e["points"], "max_score": e["max_points"],
              "output": e["message"] + (f" (cell {e['cell']})" if e.get("cell") is not None else ""),
              "visibility": "visible"} for i, (name, e) in enumerate(row.exercises.items())]
    errors = "".join(f"\ncell {e['cell']}: {e['error']}" for e in row.errors)
    return {"score": row.total, "output": f"notebook: {row.status}{errors}", "visibility": "visible",
            "stdout_visibility": "hidden", "tests": tests}


def check_gradescope(results: dict) -> None:
    """Raise ``LabkitError`` unless ``results`` has the shape Gradescope documents (tests with numeric score and
    max_score, string name/output, a known visibility)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise LabkitError(f"results.json: {what}")
    need(isinstance(results.get("tests"), list), "'tests' must be a list")
    need(isinstance(results.get("score", 0), (int, float)), "'score' must be a number")
    need(
        results.get("visibility", "visible") in GRADESCOPE_VISIBILITY,
        f"'visibility' must be one of {GRADESCOPE_VISIBILITY}",
    )
    for t in results["tests"]:
        need(isinstance(t.get("name"), str), f"test {t!r} needs a string 'name'")
        need(
            all(isinstance(t.get(k), (int, float)) for k in ("score", "max_score")),
            f"test {t['name']}: numeric score, max_score",
        )
        need(0 <= t["score"] <= t["max_score"], f"test {t['name']}: score outside 0..max_score")
        need(isinstance(t.get("output", ""), str), f"test {t['name']}: 'output' must be a string")
        need(t.get("visibility", "visible") in GRADESCOPE_VISIBILITY, f"test {t['name']}: unknown visibility")


def _feedback(row: Submission) -> str:
    from labkit.report import template

    return template("feedback.html.j2").render(row=row, max_points=sum(e["max_points"] for e in row.exercises.values()))


def write(rows: list[Submission], out: Path, gradescope: bool = False) -> None:
    """``grades.csv``, ``grades.json`` and ``feedback/<learner>.html`` (and ``gradescope/<learner>/results.json``)."""
    import pandas as pd

    names = list(rows[0].exercises) if rows else []
    table = pd.DataFrame([{"learner": r.learner, **{n: r.exercises[n]["points"] for n in names}, "total": r.total,
                           "status": r.status} for r in rows], columns=["learner", *names, "total", "status"])
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "grades.csv", table.to_csv(index=False))
    atomic.write_text(out / "grades.json", json.dumps([r.__dict__ | {"total": r.total} for r in rows], indent=1))
    for r in rows:
        try:
            page = _feedback(r)
        except Exception as exc:  # noqa: BLE001 - one learner's page must not stop the cohort's
            page = f"<!doctype html><p>feedback for this learner could not be drawn ({type(exc).__name__})</p>"
        atomic.write_text(out / "feedback" / f"{r.learner}.html", page)
        if gradescope:
            results = gradescope_results(r)
            try:
                check_gradescope(results)
            except LabkitError as exc:  # Gradescope gets a row it can read, saying what was wrong, scored 0
                results = {"score": 0.0, "output": f"the grader could not score this submission: {exc}",
                           "visibility": "visible", "tests": []}
            (out / "gradescope" / r.learner).mkdir(parents=True, exist_ok=True)
            atomic.write_text(out / "gradescope" / r.learner / "results.json", json.dumps(results, indent=1))
