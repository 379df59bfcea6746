"""Export and graph compilers: ONNX + ONNX Runtime (``onnx.py``) and TensorRT (``tensorrt.py``)."""

from labkit.export.onnx import (
    EXPORTERS,
    LEVELS,
    EncoderForExport,
    available_providers,
    calibration_feeds,
    check,
    check_provider,
    export,
    export_cnn,
    export_encoder,
    mean_pool,
    op_counts,
    optimized_counts,
    parity,
    profile_ops,
    provider_options,
    quantize_dynamic_int8,
    quantize_static_int8,
    resolve_providers,
    run,
    run_bound,
    session,
    transformer_fuse,
)

__all__ = [
    "EXPORTERS", "LEVELS", "EncoderForExport", "available_providers", "calibration_feeds", "check", "check_provider", "export", "export_cnn",
    "export_encoder", "mean_pool", "op_counts", "optimized_counts", "parity", "profile_ops", "provider_options",
    "quantize_dynamic_int8", "quantize_static_int8", "resolve_providers", "run", "run_bound", "session",
    "transformer_fuse",
]
