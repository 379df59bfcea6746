"""Write the setup cell (``labkit.course.SETUP_CELL``) and the badge-free "On Colab:" line into every notebook.

Run ``python tools/setup_cell.py`` to write it into every notebook after editing it here.
"""

from __future__ import annotations

import json
from pathlib import Path

from labkit.course import OPEN_LINE, SETUP_CELL, with_open_line


def write_all(root: Path = Path(__file__).resolve().parent.parent) -> None:
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
        first_code["source"] = SETUP_CELL
        top = nb["cells"][0]["source"]
        top = "\n".join(OPEN_LINE if ln.startswith("[![Open In Colab]") else ln for ln in top.split("\n"))
        nb["cells"][0]["source"] = with_open_line(top, None)  # no badge: only a course build knows the repository
        nb["metadata"]["accelerator"] = "GPU"
        nb["metadata"].setdefault("colab", {})["provenance"] = []
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_all()
