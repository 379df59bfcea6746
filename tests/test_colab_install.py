"""The notebooks' setup cell as Colab meets it: a fresh Python that already has torch and the kit's dependencies
(as Colab's image does) but not labkit, with the instructor's wheel beside the notebook."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = next(c for c in json.loads((ROOT / "notebooks" / "00_setup_and_baselines.ipynb").read_text())["cells"]
             if c["cell_type"] == "code")["source"]
SETUP = "".join(SETUP)


def colab_like_python(tmp: Path) -> Path:
    """A new venv that sees this environment's packages (torch included) through a .pth file — but not labkit."""
    env_dir = tmp / "colab"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # ensurepip's old setuptools would shadow the image's (torch requires a recent one); Colab has a recent one
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=False, capture_output=True)
    theirs = Path(subprocess.check_output([sys.executable, "-c", "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))"], text=True).strip())
    mirror = tmp / "image-site-packages"
    mirror.mkdir()
    for entry in theirs.iterdir():
        if "labkit" in entry.name.lower():
            continue  # the kit is what the setup cell must install
        (mirror / entry.name).symlink_to(entry)
    ours = subprocess.check_output([str(py), "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip()
    Path(ours, "colab-image.pth").write_text(str(mirror) + "\n")
    return py


@pytest.fixture(scope="module")
def colab_py(tmp_path_factory):
    """One Colab-like Python for the module (making one takes most of a minute on 2 cores)."""
    return colab_like_python(tmp_path_factory.mktemp("colab-runtime"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True)
    whl = next(out.glob("labkit-*.whl"))
    import zipfile

    names = zipfile.ZipFile(whl).namelist()
    for asset in ("labkit/assets/sentences.txt", "labkit/assets/smollm2-tokenizer/tokenizer.json",
                  "labkit/assets/smollm2-tokenizer/chat_template.jinja", "labkit/assets/minilm-tokenizer/vocab.txt",
                  "labkit/reference/README.md",
                  *(f"labkit/reference/cpu-epyc-2core/{e}.json" for e in ("baseline", "quantization", "serving",
                                                                          "pruning", "distillation", "onnx",
                                                                          "tensorrt", "capstone"))):
        assert asset in names, f"the wheel lacks {asset}"
    return whl


def run_setup(py: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    code = SETUP + "\nimport torch; print('TORCH', torch.__version__, torch.__file__)\n" \
                   "from labkit import data; print('SENTENCES', len(data.sentences()))\n" \
                   "from labkit.results import load_reference, reference_dirs\n" \
                   "rec, hw = load_reference('baseline'); fp32 = rec.variant('fp32', 'smollm2-135m')\n" \
                   "print('HEADLINE', hw, round(fp32['perplexity'], 2), reference_dirs()[0])\n"
    full_env = {k: v for k, v in os.environ.items() if k not in ("LABKIT_SOURCE", "PYTHONPATH", "VIRTUAL_ENV")}
    full_env.update(PIP_NO_INDEX="1", **env)  # Colab's image already holds every dependency: nothing to download
    return subprocess.run([str(py), "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_setup_cell_without_wheel_or_source_says_what_to_do(tmp_path, colab_py):
    r = run_setup(colab_py, tmp_path)
    assert r.returncode != 0
    assert "Upload the labkit-*.whl" in r.stderr and "LABKIT_SOURCE" in r.stderr


@pytest.mark.slow
def test_setup_cell_picks_the_newest_wheel_by_version_not_by_name(tmp_path, colab_py):
    py = colab_py
    content = tmp_path / "content"
    content.mkdir()
    for v in ("0.9.0", "0.10.0", "0.2.1"):
        (content / f"labkit-{v}-py3-none-any.whl").write_bytes(b"not a real wheel")
    r = run_setup(py, content)
    assert r.returncode != 0  # the fake wheel cannot install; what matters is which one it chose
    assert "labkit-0.10.0-py3-none-any.whl" in r.stdout, r.stdout


def test_setup_cell_installs_the_gpu_build_of_onnxruntime_alone():
    # onnxruntime-gpu beside onnxruntime leaves only the CPU provider: on a GPU runtime the cell swaps them
    assert "torch.cuda.is_available()" in SETUP
    uninstall = SETUP.index('"uninstall", "-q", "-y", "onnxruntime"')
    assert uninstall < SETUP.index('"install", "-q", "onnxruntime-gpu"')
    assert all(json.loads(p.read_text())["cells"][1]["source"] == SETUP
               for p in sorted((ROOT / "notebooks").glob("*.ipynb")))  # the same cell in every notebook


def test_every_notebook_states_its_cpu_time_and_its_gpu_status():
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        top = "".join(json.loads(p.read_text())["cells"][0]["source"])
        assert "quick mode" in top and ("minute" in top or "seconds" in top), p.name
        assert "Colab GPU: not measured yet" in top or "on a Colab GPU the full mode is not measured yet" in top \
            or "measured on" in top, p.name


@pytest.mark.slow
def test_setup_cell_installs_the_wheel_and_keeps_torch(tmp_path, wheel, colab_py):
    # runs after the tests that need labkit absent from the shared runtime (it installs it there)
    py = colab_py
    before = subprocess.check_output([str(py), "-c", "import torch; print(torch.__version__, torch.__file__)"],
                                     text=True, cwd=tmp_path).strip()
    not_yet = subprocess.run([str(py), "-c", "import labkit"], capture_output=True, cwd=tmp_path)
    assert not_yet.returncode != 0  # the kit is not in the image: the setup cell must install it
    content = tmp_path / "content"
    content.mkdir()
    (content / wheel.name).write_bytes(wheel.read_bytes())
    r = run_setup(py, content)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "installing labkit[quant] @ file://" in r.stdout and "device cpu" in r.stdout
    assert f"TORCH {before}" in r.stdout  # Colab's torch is kept, not replaced
    assert "SENTENCES" in r.stdout
    # the headline cells' numbers come from reference records inside the installed wheel, not from a checkout
    ref = json.loads((ROOT / "labkit" / "reference" / "cpu-epyc-2core" / "baseline.json").read_text())
    want = next(v["perplexity"] for v in ref["variants"] if v["name"] == "fp32" and v["model"] == "smollm2-135m")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("HEADLINE"))
    assert f" {round(want, 2)} " in line and "cpu-" in line, line
    assert "site-packages" in line and str(ROOT) not in line, line
    again = run_setup(py, content)  # a second run is a no-op
    assert again.returncode == 0 and "installing" not in again.stdout
