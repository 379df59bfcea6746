"""Shared fixtures: models are loaded once per session; the real SmolLM2 only where it matters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LABKIT_QUICK", "1")


REAL_MODEL_FIXTURES = {"smollm2", "minilm"}
EXECUTED: dict[str, object] = {}  # notebook file name -> the notebook nbmake executed in this session, outputs and all
FIGURE_CHECK = "test_executed_notebook_shows_each_figure_once"


def accelerator_startup_dir() -> str:
    """An IPYTHONDIR whose startup file runs every notebook kernel on :mod:`tests.fake_accelerator`'s stand-in
    device, so nbmake's run also proves each notebook keeps its tensors on one device (``LABKIT_DEVICE_CHECK=0``
    runs the notebooks on the plain CPU)."""
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="labkit-ipython-"))
    startup = root / "profile_default" / "startup"
    startup.mkdir(parents=True)
    harness = Path(__file__).with_name("fake_accelerator.py")
    (startup / "00-labkit-fake-accelerator.py").write_text(
        "import importlib.util as _u, sys as _sys\n"
        f"_spec = _u.spec_from_file_location('labkit_fake_accelerator', {str(harness)!r})\n"
        "_mod = _u.module_from_spec(_spec)\n"
        "_sys.modules[_spec.name] = _mod  # torch.compile imports the mode's module by name\n"
        "_spec.loader.exec_module(_mod); _mod.install()\n")
    return str(root)


def _keep_what_nbmake_executes() -> None:
    """nbmake runs every notebook and throws its outputs away; keep them, so the figure check reads the same run
    instead of running each notebook a second time. Each kernel runs on the stand-in accelerator (see
    :func:`accelerator_startup_dir`)."""
    try:
        from nbmake import nb_run
    except ImportError:
        return
    if getattr(nb_run.NotebookRun.execute, "_labkit_keeps", False):
        return
    original = nb_run.NotebookRun.execute

    ipython_dir = accelerator_startup_dir() if os.environ.get("LABKIT_DEVICE_CHECK", "1") != "0" else None

    def execute(self):
        before = os.environ.get("IPYTHONDIR")
        if ipython_dir:
            os.environ["IPYTHONDIR"] = ipython_dir
        try:
            result = original(self)
        finally:
            if before is None:
                os.environ.pop("IPYTHONDIR", None)
            else:
                os.environ["IPYTHONDIR"] = before
        EXECUTED[os.path.basename(str(self.filename))] = result.nb
        return result

    execute._labkit_keeps = True
    nb_run.NotebookRun.execute = execute


def pytest_collection_modifyitems(config, items):
    """Mark every test that loads a real model ``slow`` (so ``-m 'not slow'`` is a quick loop), skip ``gpu`` tests
    without a CUDA device, and run the notebook figure checks after nbmake's notebook runs, which they read."""
    if any(getattr(item, "nbmake", False) for item in items):
        _keep_what_nbmake_executes()
        late = [item for item in items if item.name.startswith(FIGURE_CHECK)]
        items[:] = [item for item in items if item not in late] + late
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # screenshots the browser tests keep


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (headless, no sandbox); skipped with the reason where either is
    missing (``make test`` installs both on Linux)."""
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs Debian's chromium on Linux)")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def smollm2():
    from labkit import zoo

    return zoo.load_causal_lm("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def minilm():
    from labkit import zoo

    return zoo.load_encoder("minilm-l6")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from labkit.zoo import _tokenizer_dir

    return AutoTokenizer.from_pretrained(_tokenizer_dir())


def tiny_llama(seed: int = 0, **overrides):
    """A tiny random Llama (SmolLM2's vocabulary and head layout, 2 layers) for fast exact tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def tiny_lm():
    return tiny_llama()
