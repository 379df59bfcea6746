"""The setup cell every notebook starts with (TEACHING.md): one text, checked identical across notebooks.

Run ``python tools/setup_cell.py`` to write it into every notebook after editing it here.
"""

from __future__ import annotations

import json
from pathlib import Path

SETUP_CELL = r'''# Setup (the same in every notebook). Uses labkit if it is installed; else installs it, keeping this
# runtime's torch: from the newest labkit-*.whl next to this notebook or in the working directory (an instructor
# builds it with `make dist`; on Colab, upload it in the Files pane), else from LABKIT_SOURCE (a pip spec
# your course gives you, e.g. "labkit[quant] @ https://.../labkit-0.1.0-py3-none-any.whl").
import glob, importlib, importlib.util, os, re, subprocess, sys
def _wheel_version(path):  # by version, not by name: labkit-0.10.0 is newer than labkit-0.9.0
    m = re.match(r"labkit-(\d+(?:\.\d+)*)", os.path.basename(path))
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()
if importlib.util.find_spec("labkit") is None:
    wheels = sorted(set(glob.glob("labkit-*.whl") + glob.glob("/content/labkit-*.whl")), key=_wheel_version)
    spec = (f"labkit[quant] @ file://{os.path.abspath(wheels[-1])}" if wheels
            else os.environ.get("LABKIT_SOURCE", ""))
    if not spec:
        raise RuntimeError(
            "labkit is not installed here. Upload the labkit-*.whl file your instructor built with `make dist` "
            "next to this notebook (Colab: Files pane, then run this cell again), or set LABKIT_SOURCE to the "
            "pip spec your course gives you (os.environ['LABKIT_SOURCE'] = '...').")
    print("installing", spec)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", spec], check=True)
    import torch
    if torch.cuda.is_available():  # ONNX Runtime's GPU build must be alone: beside `onnxruntime` it goes unseen
        print("GPU runtime: replacing onnxruntime by onnxruntime-gpu")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime"], check=False)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "onnxruntime-gpu"], check=False)
    importlib.invalidate_caches()
import labkit
from labkit import env
DEVICE = env.default_device()  # every model this notebook loads by hand goes here
QUICK = env.quick_mode()  # LABKIT_QUICK=1 shrinks sizes (never the story); a CPU-only Colab runtime is quick by default
print(f"labkit {labkit.__version__} · device {DEVICE} · quick mode {QUICK} · {env.bf16_note(DEVICE)}")'''

COLAB_BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/)"
               " — on Colab: *Runtime → Change runtime type → GPU*, upload this notebook and the `labkit-*.whl` "
               "your instructor built with `make dist`, then run the cells top to bottom.")


def write_all(root: Path = Path(__file__).resolve().parent.parent) -> None:
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
        first_code["source"] = SETUP_CELL
        nb["metadata"]["accelerator"] = "GPU"
        nb["metadata"].setdefault("colab", {})["provenance"] = []
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_all()
