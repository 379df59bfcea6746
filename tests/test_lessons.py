"""The shape of every lesson (../shared/TEACHING.md), checked on the stored notebooks without running them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def cells(path: Path) -> list[dict]:
    out = []
    for c in json.loads(path.read_text())["cells"]:
        src = c["source"]
        out.append({**c, "source": "".join(src) if isinstance(src, list) else src})
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_top_cell_has_the_time_needs_and_what_you_should_see_block(path):
    top = cells(path)[0]["source"]
    for part in ("**Time**", "**Needs**", "**What you should see**"):
        assert part in top, f"{path.name}: the top cell lacks {part}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_model_loaded_by_hand_names_its_device(path):
    for i, c in enumerate(cells(path)):
        if c["cell_type"] != "code":
            continue
        for call in re.findall(r"zoo\.load_(?:causal_lm|encoder|vision)\([^)]*\)", c["source"]):
            assert "device=" in call, f"{path.name} cell {i}: {call} — pass device=DEVICE (or say why the CPU)"
