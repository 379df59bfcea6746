"""TensorRT's API checked without a GPU: the TensorRT 10 and 11 Python bindings wheels install on any x86-64 machine,
but importing them needs TensorRT's shared libraries. Small stand-ins (``trt_stubs.c``) export the few C entry points
the bindings link against, so the real bindings import here and every class, enum, method and signature that
``labkit/export/tensorrt.py`` uses (its ``TRT_API`` table) is checked against both releases."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from labkit.export import tensorrt as T

HERE = Path(__file__).resolve().parent
SOURCE = Path(T.__file__)
RELEASES = {"10": "10.16.1.11", "11": "11.4.0.106"}
SONAMES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")

# How tensorrt.py names the objects it calls methods on, and the TensorRT class each one is.
OBJECTS = {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
           "profile": "IOptimizationProfile", "runtime": "Runtime", "self.engine": "ICudaEngine",
           "self.context": "IExecutionContext"}


def _uses() -> set[tuple[str, str]]:
    """(class or "", attribute) for every TensorRT name tensorrt.py touches: ``trt.X``, ``trt.X.Y`` and attributes
    of the objects in OBJECTS."""
    found = set()
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        base = ast.unparse(node.value)
        if base in ("trt", "self.trt"):
            found.add(("", node.attr))
        elif base.startswith(("trt.", "self.trt.")) and base.count(".") == (1 if base.startswith("trt.") else 2):
            found.add((base.rsplit(".", 1)[1], node.attr))
        elif base in OBJECTS:
            found.add((OBJECTS[base], node.attr))
        elif base.startswith("network.get_input("):
            found.add(("ITensor", node.attr))
    return found


def test_the_table_lists_every_tensorrt_name_the_module_uses():
    table = {(o, n) for o, n, _ in T.TRT_API + T.TRT_API_UNTIL_11}
    table |= {("", o) for o, _ in table if o}  # trt.BuilderFlag is checked by checking trt.BuilderFlag.TF32
    assert _uses() - table == set(), "tensorrt.py uses TensorRT names missing from TRT_API"
    assert ("ICudaEngine", "get_tensor_profile_shape") in _uses()  # the walk does see method calls


@pytest.fixture(scope="module")
def bindings(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{major: (folder holding tensorrt_bindings, folder of stand-in libraries)} for TensorRT 10 and 11."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the stand-in TensorRT libraries")
    root = Path(os.environ.get("LABKIT_CACHE", tmp_path_factory.mktemp("cache"))) / "tensorrt-bindings"
    out = {}
    for major, version in RELEASES.items():
        site, libs = root / version / "site", root / version / "lib"
        if not (site / "tensorrt_bindings" / "tensorrt.so").exists():
            wheels = root / version / "wheels"
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    f"tensorrt-cu12-bindings=={version}",
                    "-d",
                    str(wheels),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                pytest.skip(f"could not download tensorrt-cu12-bindings=={version}: {r.stderr.strip()[-300:]}")
            with zipfile.ZipFile(next(wheels.glob("*.whl"))) as zf:
                zf.extractall(site)
        libs.mkdir(parents=True, exist_ok=True)
        for name in SONAMES:
            so = libs / f"lib{name}.so.{major}"
            if not so.exists():
                subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(HERE / "trt_stubs.c"),
                                f"-Wl,-soname,lib{name}.so.{major}"], check=True)
        out[major] = (site, libs)
    return out


def problems_in(release: tuple[Path, Path], entries: str) -> tuple[str, list[str]]:
    site, libs = release
    code = ("import json, tensorrt_bindings as trt; from labkit.export import tensorrt as T; "
            f"print(json.dumps([trt.__version__, T.api_problems(trt, {entries})]))")
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs),
           "PYTHONPATH": os.pathsep.join([str(site), str(SOURCE.parents[2])])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    version, problems = json.loads(r.stdout.strip().splitlines()[-1])
    return version, problems


@pytest.mark.parametrize("major", sorted(RELEASES))
def test_every_name_and_signature_exists_in_tensorrt(bindings, major):
    version, problems = problems_in(bindings[major], "T.TRT_API")
    assert version == RELEASES[major]
    assert problems == [], f"TensorRT {version}: {problems}"


def test_builder_precision_flags_exist_in_10_and_are_gone_in_11(bindings):
    # build_engine uses BuilderFlag.FP16 only where strongly_typed_only() says the release still has it
    assert problems_in(bindings["10"], "T.TRT_API_UNTIL_11")[1] == []
    assert problems_in(bindings["11"], "T.TRT_API_UNTIL_11")[1] == ["BuilderFlag.FP16: TensorRT 11.4.0.106 has no FP16"]


def test_the_check_catches_a_removed_call_and_a_wrong_argument_count(bindings):
    # execute_async_v2 was removed in TensorRT 10; set_shape takes (name, min, opt, max)
    entries = '(("IExecutionContext", "execute_async_v2", 2), ("IOptimizationProfile", "set_shape", 3))'
    _, problems = problems_in(bindings["10"], entries)
    assert any("execute_async_v2" in p and "has no" in p for p in problems), problems
    assert any("set_shape: called with 3 argument(s)" in p for p in problems), problems
