"""The Llama-shaped decoders the kit steps itself (``labkit.decode.StaticDecoder`` and the paged engine's
``labkit.serve.model.PagedLlama``), and the one refusal both give for what they cannot serve exactly."""

from __future__ import annotations

from typing import Any

from labkit import LabkitError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_supported(config: Any, who: str, context: int | None = None, context_name: str = "max_len") -> None:
    """Raise unless ``who`` can run a model of ``config`` exactly over ``context`` positions: a Llama-shaped
    decoder, attending over the whole context (a sliding window shorter than the context would need masking
    neither implementation does)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LabkitError(f"model_type={model_type!r} is not supported by {who}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-shaped decoders)")
    window = getattr(config, "sliding_window", None)
    if context is not None and window and getattr(config, "use_sliding_window", True) and window < context:
        raise LabkitError(f"{context_name}={context} is past the model's sliding window ({window}); {who} attends "
                          f"over the whole context, so it would not match the model: use {context_name} <= {window}")
