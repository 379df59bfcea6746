"""A small, real paged-attention serving engine with a vLLM-shaped API.

``from labkit.serve import LLM, SamplingParams``. Modules, one concept each: ``config``, ``sampling``,
``sequence``, ``block_manager``, ``scheduler``, ``kv_cache``, ``model``, ``runner``, ``engine``.
"""

from labkit.serve.config import EngineConfig
from labkit.serve.engine import LLM, LLMEngine, RequestOutput
from labkit.serve.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
