"""Tiny helper that writes a lesson notebook from a list of (kind, source) cells, without outputs.

Usage from a build script: ``write("notebooks/00_x.ipynb", [("md", "# Title"), ("code", "x = 1")])``.
The notebooks are the source of truth once written; this only keeps their JSON tidy.
"""

from __future__ import annotations

import json
from pathlib import Path


def write(path: str, cells: list[tuple[str, str]]) -> None:
    nb = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": src.strip("\n")} if kind == "md" else
            {"cell_type": "code", "metadata": {}, "source": src.strip("\n"), "outputs": [], "execution_count": None}
            for kind, src in cells
        ],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"c{i:02d}"
    Path(path).write_text(json.dumps(nb, indent=1) + "\n")
