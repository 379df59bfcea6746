"""One lesson, one folder: everything a notebook imports from the kit is in its technique's folder or the shared
core, every technique folder holds an experiment, an exercise and its figures, and its tests mirror it."""

import ast
import json
from pathlib import Path

import pytest

from labkit import experiments, techniques

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _folders_of(notebook: str) -> set[str]:
    """The technique folders of this notebook's lesson: those whose experiments a notebook of the same number
    teaches (01a..01d are lesson 01's parts: all quantization)."""
    return {experiments.get(n).__name__.split(".")[1] for n in experiments.available()
            if experiments.get(n).NOTEBOOK[:2] == notebook[:2]}


def _kit_imports(path: Path) -> set[str]:
    """Every ``labkit`` module a notebook's code imports (``from labkit import zoo`` counts as ``labkit.zoo``)."""
    found = set()
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "labkit":
                if node.module == "labkit":
                    found |= {f"labkit.{a.name}" for a in node.names if a.name[0].islower()}
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "labkit"}
    return found - {"labkit"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_lesson_imports_from_its_folder_or_the_core(path):
    mine, core = _folders_of(path.stem), set(techniques.core())
    assert mine, f"{path.name} teaches no experiment"
    outside = sorted(m for m in _kit_imports(path) if m.split(".")[1] not in mine | core)
    assert not outside, (f"{path.name} (folder {', '.join(sorted(mine))}) imports {outside} from another lesson's "
                         "folder: move what it needs into its folder or the shared core")


def test_the_import_reader_sees_every_form():
    """The reader above is the layout test's eye: it must see plain, dotted, aliased and multi-name imports."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "%matplotlib inline\nimport labkit\nfrom labkit import zoo, prune as P, LabkitError\n"
        "import labkit.serve.engine as E\nfrom labkit.quant.layers import Int4Linear\n")])
    path = ROOT / "build" / "layout-probe.ipynb"
    path.parent.mkdir(exist_ok=True)
    path.write_text(nbformat.writes(nb))
    assert _kit_imports(path) == {"labkit.zoo", "labkit.prune", "labkit.serve.engine", "labkit.quant.layers"}


@pytest.mark.parametrize("folder", techniques.folders())
def test_every_technique_folder_is_a_whole_lesson(folder):
    """Its experiment(s), exercise(s), figures, and a test folder of the same name."""
    names = [m.rsplit(".", 1)[1] for m in techniques.modules("experiment") + techniques.modules("exercise")
             if m.startswith(f"labkit.{folder}.")]
    assert any(n.startswith("experiment") for n in names) and any(n.startswith("exercise") for n in names), names
    assert (ROOT / "labkit" / folder / "figures.py").exists() or folder == "baseline"
    assert (ROOT / "tests" / folder).is_dir(), f"tests/{folder}/ should mirror labkit/{folder}/"


def test_the_shared_core_imports_no_lesson_except_through_the_registries():
    """The core does not reach into a technique folder at import time (the registries find them by name), so
    a lesson's folder can be read, or removed, on its own."""
    folders = set(techniques.folders())
    for name in techniques.core():
        path = ROOT / "labkit" / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        for f in files:
            tree = ast.parse(f.read_text())
            top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            for node in top:
                mods = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else []) + \
                       [a.name for a in node.names if isinstance(node, ast.Import)]
                if isinstance(node, ast.ImportFrom) and node.module == "labkit":
                    mods = [f"labkit.{a.name}" for a in node.names]
                bad = [m for m in mods if m.startswith("labkit.") and m.split(".")[1] in folders]
                assert not bad, f"{f.relative_to(ROOT)} imports {bad} at module level"
