"""Notebook times come from a measurement, never from memory: this reads the JUnit XML of a `make test` run
(nbmake times each notebook) and writes the quick-mode time into README's notebook table and into each
notebook's **Time** line. `tests/test_lessons.py` checks the two agree.

    .venv/bin/python -m pytest tests --nbmake notebooks --junitxml=junit.xml ...
    python tools/notebook_times.py junit.xml
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from labkit.course import spoken

ROOT = Path(__file__).resolve().parent.parent
TIME_LINE = re.compile(r"\*\*Time\*\*: about [^\n]*? in CPU quick mode")
ROW = re.compile(r"^(\| `(\d\d[a-z]?_[a-z0-9_]+)` \|.*\| )([^|]*)( \|)$", re.M)


def nbmake_seconds(junit: Path) -> dict[str, float]:
    """Notebook stem -> seconds, from nbmake's test cases in a JUnit XML file."""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        m = re.search(r"(\d\d[a-z]?_[a-z0-9_]+)\.ipynb", case.get("classname", "") + " " + case.get("name", ""))
        if m and case.find("failure") is None and case.find("error") is None:
            out[m.group(1)] = float(case.get("time", 0))
    return out


def update(junit: Path) -> dict[str, float]:
    times = nbmake_seconds(junit)
    if not times:
        raise SystemExit(f"{junit}: no passing notebook test cases (run pytest with --nbmake and --junitxml)")
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = ROW.sub(lambda m: m.group(1) + (f"{times[m.group(2)]:.0f} s" if m.group(2) in times else m.group(3))
                   + m.group(4), text)
    readme.write_text(text)
    for stem, secs in times.items():
        path = ROOT / "notebooks" / f"{stem}.ipynb"
        nb = json.loads(path.read_text())
        head = nb["cells"][0]
        src = "".join(head["source"])
        head["source"] = TIME_LINE.sub(f"**Time**: about {spoken(secs)} in CPU quick mode", src, count=1)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return times


if __name__ == "__main__":
    for name, secs in update(Path(sys.argv[1])).items():
        print(f"{name}: {secs:.0f} s -> about {spoken(secs)}")
