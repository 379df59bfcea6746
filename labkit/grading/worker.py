"""Run one submitted notebook for ``labkit grade``: ``python -m labkit.grading.worker NOTEBOOK RESULT CELL_TIMEOUT``.

It starts in the submission's temporary directory (the grader chose it, set the memory limit and the
environment), runs every code cell in order in a fresh kernel confined by :mod:`labkit.grading.guard`, attributes
each exercise check (the JSON lines ``exercises.check`` appends to ``$LABKIT_GRADE_LOG``) to the cell that made it,
and writes ``RESULT``: the checks, and what went wrong (a cell that raised, timed out, or a kernel that died).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RAN = "ran to the end"
MAX_MESSAGE = 500  # characters of a learner's error kept in the feedback
STARTUP_TIMEOUT = 180  # s for a new kernel to answer (nbclient: 60); a loaded 2-core machine starts them slowly
KERNEL_STARTS = 2  # a kernel that dies or stays silent while starting is started once more


def _checks(log: Path, seen: int) -> tuple[list[dict], int]:
    if not log.exists():
        return [], seen
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    found = []
    for line in lines[seen:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            found.append(entry)
    return found, len(lines)


def run(notebook: Path, result: Path, cell_timeout: float) -> dict:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    forbidden = json.loads(os.environ.get("LABKIT_GRADE_FORBIDDEN", "[]"))
    setup = nbformat.v4.new_code_cell(
        f"import labkit.grading.guard as _guard\n_guard.install({os.getcwd()!r}, {forbidden!r})\ndel _guard")
    nb.cells.insert(0, setup)  # run as the notebook's own first cell: nbclient files outputs by cell index
    for attempt in range(1, KERNEL_STARTS + 1):
        client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                                startup_timeout=STARTUP_TIMEOUT, resources={"metadata": {"path": os.getcwd()}})
        ran = False
        try:
            with client.setup_kernel():
                ran = True
                return _run_cells(client, nb, cell_timeout)
        except RuntimeError as exc:  # a kernel that did not start is the grader's trouble, not the learner's
            if ran or attempt == KERNEL_STARTS:
                raise RuntimeError(f"{'' if ran else 'starting the kernel: '}{exc}") from exc
    raise AssertionError("unreachable")


def _run_cells(client, nb, cell_timeout: float) -> dict:
    """Run the grader's setup cell, then the learner's code cells in order, until one times out or kills the kernel."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    log = Path(os.environ["LABKIT_GRADE_LOG"])
    out: dict = {"checks": [], "errors": [], "status": RAN}
    setup = nb.cells[0]
    client.execute_cell(setup, 0, store_history=False)
    if any(o.get("output_type") == "error" for o in setup.outputs):
        out["status"] = "the grader's setup cell failed"
        return out
    seen = 0
    for i, cell in enumerate(nb.cells[1:], start=1):  # i: the learner's cell number, counting from 1
        if cell.cell_type != "code":
            continue
        try:
            client.execute_cell(cell, i)
        except CellTimeoutError:
            out["status"] = f"cell {i} ran past {cell_timeout:g} s and was stopped; later cells did not run"
        except DeadKernelError:
            out["status"] = (f"the kernel died in cell {i} (most often: it ran out of the memory limit); "
                             "later cells did not run")
        found, seen = _checks(log, seen)
        out["checks"] += [{**c, "cell": i} for c in found]
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out["errors"].append({"cell": i, "error": f"{o.get('ename')}: {o.get('evalue')}"[:MAX_MESSAGE]})
        cell.outputs = []  # a cell that prints megabytes is not kept
        if out["status"] != RAN:
            break
    if out["status"] == RAN and out["errors"]:
        out["status"] = f"ran to the end; {len(out['errors'])} cell(s) raised (see errors)"
    return out


def main() -> None:
    notebook, result, cell_timeout = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    try:
        out = run(notebook, result, cell_timeout)
    except Exception as exc:  # noqa: BLE001 - reported in the learner's row, never a crash of the cohort
        out = {"checks": [], "errors": [], "status": f"could not run: {type(exc).__name__}: {exc}"[:MAX_MESSAGE]}
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out), encoding="utf-8")
    tmp.replace(result)


if __name__ == "__main__":
    main()
