"""The notebooks' setup cell as a Colab learner meets it.

A fresh environment holds what Colab's GPU runtime holds, at the versions Google publishes
(``tests/data/colab-gpu-runtime.txt``; torch's CPU build stands in for the CUDA one), and no kit. The setup cell then
installs the kit's wheel through the package index exactly as on Colab, notebook 00 runs in a kernel of that
environment, and every widget is built and updated there under Colab's ipywidgets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from labkit.course import DISTRIBUTION, SETUP_CELL, WHEEL_PREFIX

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "tests" / "data" / "colab-gpu-runtime.txt"
TORCH_STAND_IN = "torch==2.13.0"  # the CPU build on this disk; Colab's is the CUDA build named in RUNTIME
# pins this machine cannot reproduce beside the stand-in torch (torch 2.13 needs a newer setuptools than Colab's)
NOT_REPRODUCED = ("setuptools",)


def colab_pins() -> dict[str, str]:
    """{name: version} of Colab's runtime as the data file records it."""
    pins = {}
    for line in RUNTIME.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def _pip(py: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_INDEX")}
    return subprocess.run([str(py), "-m", "pip", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def colab_py(tmp_path_factory) -> Path:
    """A new environment at Colab's published versions, without the kit (about a minute on 2 cores)."""
    env_dir = tmp_path_factory.mktemp("colab-runtime") / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pins = colab_pins()
    assert _pip(py, "install", "-q", f"pip=={pins['pip']}").returncode == 0
    reqs = [f"{n}=={v}" for n, v in pins.items() if n not in ("pip", "torch", *NOT_REPRODUCED)]
    r = _pip(py, "install", "-q", TORCH_STAND_IN, *reqs, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return py


def installed(py: Path) -> dict[str, str]:
    out = subprocess.check_output(
        [
            str(py),
            "-c",
            "import importlib.metadata as m, json; print(json.dumps("
            "{d.metadata['Name'].lower(): d.version for d in m.distributions()}))",
        ],
        text=True,
        cwd="/",
    )
    return json.loads(out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True)
    return next(out.glob(f"{WHEEL_PREFIX}-*.whl"))


def fake_2015_labkit(where: Path) -> Path:
    """A stand-in for PyPI's unrelated ``labkit 0.0.3.dev11``: a wheel whose ``labkit`` package is not the kit."""
    whl = where / "labkit-0.0.3.dev11-py3-none-any.whl"
    info = "labkit-0.0.3.dev11.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("labkit/__init__.py", '"""commutils"""\n')
        z.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: labkit\nVersion: 0.0.3.dev11\nSummary: commutils\n"
        )
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"labkit/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return whl


def run_setup(py: Path, cwd: Path, before: str = "", after: str = "", **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("LABKIT_SOURCE", "PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_INDEX", "LABKIT_DEVICE")}
    full_env.update(env)
    return subprocess.run([str(py), "-c", before + SETUP_CELL + "\n" + after], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=1200)


def test_the_wheel_holds_every_asset_and_reference_record(wheel):
    """Notebooks read tokenizers, sentences and reference records from the installed package: all must ship."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("assets", "reference"):
        for path in (ROOT / "labkit" / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert path.relative_to(ROOT).as_posix() in names, f"the wheel lacks {path.relative_to(ROOT)}"
    assert wheel.name.startswith(f"{WHEEL_PREFIX}-")


def test_every_notebook_carries_the_setup_cell_and_no_dead_colab_link():
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        assert "".join(cells[1]["source"]) == SETUP_CELL, f"run `python tools/setup_cell.py` ({p.name})"
        top = "".join(cells[0]["source"])
        assert "colab.research.google.com" not in top, f"{p.name}: a badge belongs only in a course build"
        assert "On Colab:" in top


def test_every_notebook_states_its_cpu_time_and_its_gpu_status():
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        top = "".join(json.loads(p.read_text())["cells"][0]["source"])
        assert "quick mode" in top and ("minute" in top or "seconds" in top), p.name
        assert "not measured" in top or "measured on" in top, p.name


@pytest.mark.slow
def test_setup_cell_without_wheel_or_source_says_what_to_do(tmp_path, colab_py):
    r = run_setup(colab_py, tmp_path, LABKIT_DRIVE_MOUNT=str(tmp_path / "drive"))
    assert r.returncode != 0
    assert "no labkit_inference-*.whl was found" in r.stderr and "LABKIT_SOURCE" in r.stderr
    assert "labkit-course" in r.stderr  # it says which Drive folders it searched


@pytest.mark.slow
def test_setup_cell_picks_the_newest_wheel_by_version_not_by_name(tmp_path, colab_py):
    for v in ("0.9.0", "0.10.0", "0.2.1"):
        (tmp_path / f"{WHEEL_PREFIX}-{v}-py3-none-any.whl").write_bytes(b"not a real wheel")
    r = run_setup(colab_py, tmp_path)
    assert r.returncode != 0 and "pip could not install" in r.stderr  # what matters is which one it chose
    assert f"{WHEEL_PREFIX}-0.10.0-py3-none-any.whl" in r.stdout, r.stdout


@pytest.mark.slow
def test_setup_cell_refuses_pypis_other_labkit(tmp_path, colab_py):
    fake = fake_2015_labkit(tmp_path)
    r = run_setup(colab_py, tmp_path, LABKIT_SOURCE=f"labkit @ file://{fake}")
    try:
        assert r.returncode != 0
        assert f"did not install {DISTRIBUTION}" in r.stderr and "labkit 0.0.3.dev11" in r.stderr, r.stderr[-2000:]
        again = run_setup(colab_py, tmp_path)  # a runtime that already holds it is refused before anything runs
        assert again.returncode != 0 and "comes from labkit 0.0.3.dev11" in again.stderr, again.stderr[-2000:]
        assert "installing" not in again.stdout
    finally:
        _pip(colab_py, "uninstall", "-q", "-y", "labkit")


@pytest.mark.slow
def test_setup_cell_finds_the_course_folder_on_google_drive(tmp_path, colab_py):
    """As on Colab: `google.colab` imported, nothing beside the notebook; the cell mounts Drive (here a stand-in
    `drive.mount`) and finds the wheel in My Drive/labkit-course. The install itself is not run (PIP_NO_INDEX and a
    placeholder wheel): the other tests install."""
    course = tmp_path / "shared" / "labkit-course"
    course.mkdir(parents=True)
    (course / f"{WHEEL_PREFIX}-0.1.0-py3-none-any.whl").write_bytes(b"placeholder")
    stub = tmp_path / "stub" / "google" / "colab"
    stub.mkdir(parents=True)
    (stub.parent / "__init__.py").write_text("")
    (stub / "__init__.py").write_text("")
    (stub / "drive.py").write_text(
        "import os\n"
        "def mount(path):\n"
        f"    os.makedirs(os.path.join(path, 'MyDrive'))\n"
        f"    os.symlink({str(course)!r}, os.path.join(path, 'MyDrive', 'labkit-course'))\n"
        "    print('Mounted at', path)\n")
    content = tmp_path / "content"
    content.mkdir()
    before = f"import sys; sys.path.insert(0, {str(tmp_path / 'stub')!r}); import google.colab\n"
    r = run_setup(colab_py, content, before=before, LABKIT_DRIVE_MOUNT=str(tmp_path / "drive"), PIP_NO_INDEX="1")
    assert "mounting Google Drive" in r.stdout and "Mounted at" in r.stdout, r.stdout + r.stderr[-2000:]
    assert f"MyDrive/labkit-course/{WHEEL_PREFIX}-0.1.0-py3-none-any.whl" in r.stdout


@pytest.mark.slow
def test_colab_runtime_installs_the_wheel_runs_notebook_00_and_every_widget(tmp_path, wheel, colab_py):
    """The whole path at Colab's versions: the cell installs through the index, keeps torch, says what it changed;
    notebook 00 runs in a kernel of that environment; the widget tests pass under Colab's ipywidgets."""
    pytest.importorskip("nbclient")
    import nbformat
    from nbclient import NotebookClient

    from labkit import zoo

    zoo.fetch(["smollm2-135m"])  # the shared model cache notebook 00 reads (offline here, the hub on Colab)
    before = installed(colab_py)
    assert DISTRIBUTION not in before and "labkit" not in before
    content = tmp_path / "content"
    content.mkdir()
    shutil.copy2(wheel, content / wheel.name)
    r = run_setup(colab_py, content, after="import torch; print('TORCH', torch.__version__)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"installing {DISTRIBUTION}[quant] @ file://" in r.stdout and "device cpu" in r.stdout
    after = installed(colab_py)
    assert f"TORCH {before['torch']}" in r.stdout  # Colab's torch is kept, not replaced
    changed = {d for d in before if after.get(d) != before[d]}
    for d in changed:  # every version pip changed is said in the cell's output
        assert f"{d} {before[d]} → {after[d]}" in r.stdout, (d, r.stdout)
    assert after["ipywidgets"] == before["ipywidgets"] == colab_pins()["ipywidgets"]  # the kit works with Colab's
    again = run_setup(colab_py, content)
    assert again.returncode == 0 and "installing" not in again.stdout  # a second run is a no-op

    kernels = tmp_path / "kernels" / "colab"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(colab_py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "colab-like", "language": "python"}))
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(ROOT / "notebooks" / "00_setup_and_baselines.ipynb", as_version=4)
    km = KernelManager(
        kernel_name="colab", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LABKIT_DEVICE")}
    env["LABKIT_QUICK"] = "1"
    NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(content)}}).execute(env=env)
    setup_out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert f"({DISTRIBUTION})" in setup_out and "quick mode True" in setup_out, setup_out

    # every widget built and updated under Colab's ipywidgets, from the installed wheel (not this checkout)
    check = tmp_path / "widget-check"
    check.mkdir()
    shutil.copy2(ROOT / "tests" / "viz" / "test_widgets.py", check / "test_widgets.py")
    shutil.copy2(ROOT / "tests" / "conftest.py", check / "conftest.py")
    w = subprocess.run([str(colab_py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(check),
                        "-o", "addopts=", "--rootdir", str(check)],
                       cwd=check, env=env, capture_output=True, text=True, timeout=900)
    assert w.returncode == 0, w.stdout[-4000:] + w.stderr[-2000:]
    probe = subprocess.run([str(colab_py), "-c", "import labkit, ipywidgets; print(labkit.__file__, "
                            "ipywidgets.__version__)"], cwd=check, env=env, capture_output=True, text=True)
    assert "site-packages" in probe.stdout and str(ROOT) not in probe.stdout
    assert probe.stdout.split()[-1] == colab_pins()["ipywidgets"]
