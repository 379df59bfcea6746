"""Quantization: pure primitives, packed layers, ``quantize_(model, config)``, GPTQ and bitsandbytes."""

from labkit.quant.api import (
    DtypeConfig,
    Int4Config,
    Int8Config,
    NF4Config,
    QuantReport,
    quantize_,
)

__all__ = ["DtypeConfig", "Int4Config", "Int8Config", "NF4Config", "QuantReport", "quantize_"]
