"""bitsandbytes through transformers, exactly as the source article loads a model.

bitsandbytes >= 0.47 runs 4-bit (NF4/FP4) and LLM.int8 on x86-64 CPUs as well as CUDA. Its layers
(``Linear4bit``, ``Linear8bitLt``) keep packed weights plus a ``quant_state``; ``labkit.measure.weight_bytes``
counts both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labkit import LabkitError, env, zoo


def require_bnb() -> Any:
    """Import bitsandbytes or explain what is missing for this device."""
    if env.lib_version("bitsandbytes") is None:
        raise LabkitError("bitsandbytes is not installed: pip install 'bitsandbytes>=0.47' (CPU and CUDA wheels)")
    backend = env.bnb_backend()
    if backend is None:
        raise LabkitError(f"bitsandbytes {env.lib_version('bitsandbytes')} has no backend for this machine "
                          f"({env.cpu_name()}, no CUDA); it supports CUDA GPUs and x86-64 / aarch64 CPUs")
    import bitsandbytes

    return bitsandbytes


def has_avx512bf16() -> bool:
    """Whether bitsandbytes' fused 4-bit CPU kernel can run here: it needs AVX512-BF16, and only then does its
    ``Linear4bit`` repack each weight on the first CPU forward (``_convert_weight_packed_for_cpu``). False when
    bitsandbytes is absent."""
    if env.lib_version("bitsandbytes") is None or env.bnb_backend() is None:
        return False
    from bitsandbytes.functional import has_avx512bf16 as probe

    return bool(probe())


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True):
    """The article's config: 4-bit NF4, double quantization, bf16 compute (fp16 where bf16 is not native:
    :func:`labkit.env.half_dtype`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def int8_config():
    """LLM.int8(): int8 weights with fp16 outlier columns (threshold 6.0)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def load_causal_lm_bnb(name: str = "smollm2-135m", mode: str = "nf4", *, device: str | None = None,
                       source: str = "auto") -> tuple[nn.Module, Any]:
    """Load ``name`` through ``from_pretrained(..., quantization_config=...)``; ``mode`` is 'nf4' or 'int8'.
    A random model (``smollm2-135m-random``) is saved to a temporary folder first, then loaded the same way."""
    if mode not in ("nf4", "int8"):
        raise LabkitError(f"mode={mode!r} is not allowed; use 'nf4' or 'int8'")
    require_bnb()
    card = zoo.check_name(name, kind="causal-lm")
    device = str(env.resolve_device(device))
    if name.endswith("-random"):  # bitsandbytes quantizes while loading saved weights: save the random ones first
        with zoo.saved_random_llm(name) as path:
            model, tok = _load(path, mode, device)
    else:
        model, tok = _load(card.hub_id if source == "hub" else zoo._smollm2_fp32_dir(progress=False), mode, device)
    model.labkit_card = card
    return model, tok


def _load(path, mode: str, device: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = env.half_dtype(device)  # bf16 where native; a T4 emulates bf16, so fp16 there
    qconfig = nf4_config(half) if mode == "nf4" else int8_config()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, device_map=device,
                                                 dtype=half if mode == "nf4" else torch.float16)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok
